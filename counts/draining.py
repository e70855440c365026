"""Draining dirty marks: plan from marks, then lock, credit or recount, and write, in one
transaction.

The shape follows Django's deletion collector (record the work first, perform it after):

1. **take** up to ``batch_size`` marks that are due, ``FOR UPDATE SKIP LOCKED`` (other drainers
   take others), keep a prefix worth at most ``max_ids`` ids, and delete it; the same statement
   locks the items its item marks name (step 3's locks, taken early), unless it took a job
   mark;
2. **plan**: delta marks add up into credits per (model, column, row); recount marks (and
   marks of counts kept in full, resolved to rows here, ``counts.routes``) become rows to
   recount; item marks become items to recompute; job marks (a setting changed) are expanded
   into the items they can flip (``counts.jobs``); "every row" marks expand into chunked marks
   for later batches;
3. **items**, per kind: lock each item without waiting, read its truth in a later statement,
   credit the difference from its ledger and write the ledger (``counts.items``, where the
   correctness argument is); items someone holds are marked again, due a little later;
4. **targets**: models that only get amounts are written together, in one statement
   (``counts.applying``); then, per model in label order, lock the rows nobody else holds
   (``FOR NO KEY UPDATE SKIP LOCKED``, id order); recount the rows marked for it with the formula
   ``truth - pending - adjustment`` (``counts.aggregate``: it absorbs this batch's credits to
   them, which are not added on top); add the credits to the others in one statement
   (``counts.applying``); queue both again, due a little later, for rows someone holds.

All of it commits together. A crash before commit rolls the deletes back, so no mark is lost.
Every amount is, in every snapshot, either in the queue or in its row, never both: the
transaction that deletes a delta mark adds it to the row or queues it again. A drain never
waits on a row lock, so one busy row cannot stall its model and a drain cannot deadlock with a
writer or another drain; the order of acquisition is marks, items (every item of the batch,
by kind and id, before any is recomputed: the only waits among them, for a new item's ledger
row, come in one order), multiplicity rows (by key), targets (by label, by id).

Every write runs in :func:`engine_transaction`, under the engine's setting: the only writes to
cached columns the guard triggers let through.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

from django.db import connections, transaction

from counts import aggregate, applying, items, prepared, routes
from counts.apps import graph
from counts.errors import UnknownTargetError
from counts.guards import ENGINE_SETTING
from counts.items import item_kinds, mark_every_item, mark_items_sql
from counts.jobs import JOB_PREFIX, expand, jobs_by_key
from counts.marks import defer
from counts.modes import incremental_columns
from counts.notice import quiet
from counts.triggers import MARK_TABLE, q

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
        """Nothing was recomputed or expanded: the batch found no marks, or only busy rows."""
        return not any(self.targets.values()) and not self.expanded

    def as_log(self) -> dict:
        return {
            "marks": self.marks,
            "targets": sum(self.targets.values()),
            "changed": sum(self.changed.values()),
            "deferred": sum(self.deferred.values()),
            "by_model": {k: [self.targets.get(k, 0), self.changed.get(k, 0)] for k in self.targets},
            "ms": round(self.ms, 1),
        }


@contextlib.contextmanager
def engine_transaction(
    using: str = "default", lock_timeout_ms: int | None = None, lazy: bool = False
):
    """One recompute transaction (or savepoint): yields a cursor with the engine's settings.

    The engine's setting lets this block, and nothing else, write cached columns (the guard
    triggers keep them otherwise). ``set_config(..., true)`` lasts until the end of the
    *outermost* transaction, and a savepoint's release hands it on to the caller's
    transaction; so it is switched off again before the block ends, or a caller's stale
    ``save()`` later in the same request would slip past the guards. (A rollback undoes it by
    itself.)

    JIT off: a batch's aggregate is estimated expensive enough to be compiled, and compiling it
    (about 135 ms for 500 capture sets) costs more than running it. The lock timeout, when
    given, bounds the wait for a lock that ``SKIP LOCKED`` cannot skip (a table lock taken by a
    migration or a ``LOCK TABLE``). Generic plans, when ``counts.prepared`` may force them: the
    hot statements then run on ``cursor.prepared``, planned once per connection.

    ``lazy``: the settings are applied by ``cursor.engine_on()``, once there is something to
    write; a drain that finds no mark then costs one query and a commit.
    """
    timeout = "0" if lock_timeout_ms is None else f"{lock_timeout_ms}ms"
    # The outermost transaction takes the settings away with its commit or rollback; a
    # savepoint hands them on to the caller's transaction, so only then are they switched off.
    nested = connections[using].in_atomic_block
    with transaction.atomic(using=using), quiet(using):
        cursor = connections[using].cursor()
        on = []
        plans = GENERIC if prepared.generic_plans(using) else None

        def engine_on(already: bool = False) -> None:
            """Apply the settings (``already``: a statement of the caller's applied them)."""
            if not on and not already:
                cursor.execute(f"SELECT {SETTINGS_SQL}", cursor.engine_params)
            on.append(True)

        cursor.engine_on = engine_on
        cursor.engine_params = [ENGINE_SETTING, timeout, plans]
        # The hot statements' cursor: same connection, same transaction (``counts.prepared``).
        cursor.prepared = prepared.cursor(using)
        if not lazy:
            engine_on()
        yield cursor
        if on and nested:
            # The plan cache mode goes back to the session's reset value (a plain ``SET``
            # earlier in the session is not known here: such a session keeps its parameters
            # client-bound anyway, see ``counts.prepared``).
            cursor.execute(
                "SELECT set_config(%s, 'off', true), set_config('plan_cache_mode',"
                " (SELECT reset_val FROM pg_settings WHERE name = 'plan_cache_mode'), true)",
                [ENGINE_SETTING],
            )


#: The engine's transaction settings as one expression (parameters: the engine setting's
#: name, the lock timeout, the plan cache mode or NULL to keep the session's).
SETTINGS_SQL = (
    "concat(set_config(%s, 'on', true), set_config('jit', 'off', true),"
    " set_config('lock_timeout', %s, true),"
    " set_config('plan_cache_mode', coalesce(%s, current_setting('plan_cache_mode')), true))"
)
#: The plan cache mode of an engine transaction whose hot statements are prepared
#: (``counts.prepared``): one plan per connection, never one per batch.
GENERIC = "force_generic_plan"
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

    The same statement locks the items its item marks name (``items.lock_marked_sql``), unless
    it took a job mark.

    Returns (marks taken, whether free due marks were left: the lock filled the batch, or
    ``max_ids`` cut it, ``{item kind: ids locked}`` or None when the items are still to be
    locked). Marks other drains hold are theirs; marks committed after this statement's
    snapshot are as invisible to it as to a confirming look a moment earlier, and their
    writers ask for a drain of their own."""
    where = "(not_before IS NULL OR not_before <= now())"
    where += " AND target = ANY(%s)" if labels else ""
    params: list = [labels] if labels else []
    lock_ctes, locked_items = items.lock_marked_sql("taken")
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
        " (SELECT count(*) FROM locked) = %s OR (SELECT count(*) FROM locked)"
        f" > (SELECT count(*) FROM picked), ({locked_items})::text FROM taken",
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


def _expand(cursor, label: str) -> int:
    """Replace an "every row" mark by chunked marks covering every current row."""
    table = graph().targets[label]
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

    credits: dict = field(default_factory=lambda: defaultdict(int))  # (label, column, id) -> n
    recount: dict = field(default_factory=lambda: defaultdict(set))  # label -> ids
    items: dict = field(default_factory=lambda: defaultdict(set))  # item kind -> ids


def _plan(cursor, taken, result: DrainResult) -> _Plan:
    known = graph().targets
    kinds = item_kinds(graph())
    incremental = incremental_columns()
    plan = _Plan()
    for _mark_id, target, ids, column, deltas, payload in taken:
        if target in kinds and column and column.startswith(JOB_PREFIX):
            job = jobs_by_key(graph()).get(column)
            if job is not None:  # else the count that started it is gone
                found = expand(cursor, job, list(ids), payload)
                if len(found) <= items.CHUNK:
                    plan.items[target].update(found)
                else:
                    # A big job is recomputed by later batches, a chunk each.
                    source = "(SELECT unnest(%s::bigint[]) AS id)"
                    cursor.execute(mark_items_sql(kinds[target], source, "id"), [found])
                    result.expanded[target] = result.expanded.get(target, 0) + 1
        elif target in kinds:
            if ids is None:
                mark_every_item(cursor, kinds[target])
                result.expanded[target] = result.expanded.get(target, 0) + 1
            else:
                plan.items[target].update(ids)
        elif target not in known:
            # A model (or item kind) whose counts were removed: its marks mean nothing any more.
            continue
        elif ids is None:
            result.expanded[target] = _expand(cursor, target)
        elif deltas is None and column and column.startswith("via:"):
            plan.recount[target].update(routes.resolve(cursor, graph(), column, ids) or ())
        elif deltas is None:
            plan.recount[target].update(ids)
        elif column in incremental.get(target, ()):
            for target_id, amount in zip(ids, deltas, strict=True):
                plan.credits[(target, column, target_id)] += amount
        else:
            # The count changed mode or went away since: its amounts mean nothing, recount.
            plan.recount[target].update(ids)
    return plan


def drain(
    batch_size: int = BATCH_SIZE,
    max_ids: int = MAX_IDS,
    targets: list[str] | None = None,
    using: str = "default",
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> DrainResult:
    """Consume one batch of marks and bring their targets' counts up to date.

    Args:
        batch_size: Most marks taken.
        max_ids: Most target (or item) ids taken (a single larger mark is still taken whole).
        targets: Only marks for these model labels or item kinds (all when None).
        lock_timeout_ms: How long to wait for a lock ``SKIP LOCKED`` cannot skip.
    """
    started = time.perf_counter()
    result = DrainResult()
    kinds = item_kinds(graph())
    with engine_transaction(using, lock_timeout_ms, lazy=True) as cursor:
        taken, result.more, locked = _take(cursor, batch_size, max_ids, targets, kinds)
        result.marks = len(taken)
        if taken:
            cursor.engine_on(already=True)
        plan = _plan(cursor, taken, result)
        if locked is None:
            # A job mark was taken: its items are known now. Every item of the batch is
            # locked before any is recomputed, as the take does (see ``_take``).
            locked = {
                kind: items.lock_items(cursor, kinds[kind], sorted(plan.items[kind]))
                for kind in sorted(plan.items)
            }
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
        _write_targets(cursor, plan, result, using)
    result.more = result.more or bool(result.expanded)
    result.ms = (time.perf_counter() - started) * 1000
    return result


def _settle(cursor, statement, credits: dict, applied: set[int], result: DrainResult) -> None:
    """Report the rows of one model that got ``credits`` (``{(column, id): amount}``);
    queue again the amounts of rows someone holds (a row that is gone needs none)."""
    label = statement.label
    wanted = {target_id for _column, target_id in credits}
    result.targets[label] = result.changed[label] = len(applied)
    if len(applied) < len(wanted):
        missing = sorted(wanted - applied)
        held = set(aggregate.held_elsewhere(cursor, statement, missing, []))
        applying.defer_credits(cursor, label, {k: v for k, v in credits.items() if k[1] in held})
        if held:
            result.deferred[label] = len(held)


def _write_targets(cursor, plan: _Plan, result: DrainResult, using: str) -> None:
    """Add the amounts of every model that only gets amounts, in one statement; then, per
    model with rows to recount, in label order: lock what is free, recount the rows marked
    for it (the formula absorbs this batch's credits to them), add the credits to the others.
    Amounts and recounts for rows someone else holds are queued again."""
    by_label: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
    for (label, column, target_id), amount in plan.credits.items():
        if amount:
            by_label[label][(column, target_id)] = amount
    # Models that only need amounts added: every one of them in one statement; the rows it
    # left out are held by someone (or gone), and their amounts go back to the queue.
    only_credits = sorted(label for label in by_label if not plan.recount.get(label))
    batches = [
        (aggregate.compile_recompute(label, using), by_label[label]) for label in only_credits
    ]
    written = applying.lock_and_apply_all(cursor, batches)
    for statement, credits in batches:
        _settle(cursor, statement, credits, written.get(statement.label, set()), result)
    for label in sorted(label for label in plan.recount if plan.recount[label]):
        statement = aggregate.compile_recompute(label, using)
        credits = by_label.get(label, {})
        recount = plan.recount[label]
        ids = sorted(recount | {target_id for _column, target_id in credits})
        locked = aggregate.lock(cursor, statement, ids)
        held = aggregate.held_elsewhere(cursor, statement, ids, locked)
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


def _recompute(cursor, label: str, ids: list[int], using: str) -> tuple[int, int, int]:
    """Lock what can be locked, recompute and write it, mark the rest again for later.

    Returns:
        (rows recomputed, rows whose counts changed, rows deferred because someone holds them)
    """
    statement = aggregate.compile_recompute(label, using)
    locked, held = claim(cursor, statement, label, ids)
    changes = aggregate.run(cursor, statement, locked, write=True)
    return len(locked), len(changes), held


def claim(cursor, statement, label: str, ids: list[int]) -> tuple[list[int], int]:
    """Lock the rows of ``ids`` nobody else holds; mark the held ones again, due a little later.

    Drains, "Recompute now" and reconcile all claim rows this way, so none of them ever waits
    on a row lock. Returns (ids locked, rows deferred).
    """
    locked = aggregate.lock(cursor, statement, ids)
    held = aggregate.held_elsewhere(cursor, statement, ids, locked)
    if held:
        defer(cursor, label, held)
    return locked, len(held)


def recompute_rows(ids_by_label: dict[str, list[int]], using: str = "default") -> tuple[int, int]:
    """Recompute the given rows now, under the same locks as a drain.

    A row another transaction holds is marked instead, for the workers to recompute once it is
    free: "Recompute now" never hangs on an admin form left open.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    recomputed = changed = 0
    with engine_transaction(using) as cursor:
        for label in sorted(ids_by_label):
            if label not in graph().targets:
                raise UnknownTargetError(label)
            done, written, _deferred = _recompute(
                cursor, label, sorted(set(ids_by_label[label])), using
            )
            recomputed += done
            changed += written
    return recomputed, changed
