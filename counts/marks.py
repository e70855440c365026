"""Draining dirty marks: plan from marks, then lock, recompute and write in one transaction.

The shape follows Django's deletion collector — record the work first, perform it after:

1. take up to ``batch_size`` marks with ``FOR UPDATE SKIP LOCKED`` (other drainers take
   others), keep a prefix of them worth at most ``max_ids`` target ids, and delete those;
2. plan: ``{label: {ids}}``, expanding "every row" marks into chunked marks for later batches;
3. for each target model in label order, lock its rows in id order, recompute and write.

All of it commits together. A crash before commit rolls the deletes back, so no mark is lost;
a mark is consumed only by a committed recompute whose snapshot is newer than the mark.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from django.db import connections, transaction

from counts import aggregate
from counts.apps import graph
from counts.capture import QUIET_ATTR
from counts.errors import UnknownTargetError
from counts.triggers import MARK_TABLE, q

#: Target ids in one expanded chunk of an "every row" mark.
EXPAND_CHUNK = 2000


@dataclass
class DrainResult:
    """What one drain transaction did (also the structured log line of a batch)."""

    marks: int = 0
    targets: dict[str, int] = field(default_factory=dict)  # label -> rows recomputed
    changed: dict[str, int] = field(default_factory=dict)  # label -> rows written
    expanded: dict[str, int] = field(default_factory=dict)  # label -> chunk marks created
    ms: float = 0.0

    @property
    def empty(self) -> bool:
        return self.marks == 0

    def as_log(self) -> dict:
        return {
            "marks": self.marks,
            "targets": sum(self.targets.values()),
            "changed": sum(self.changed.values()),
            "by_model": {k: [self.targets.get(k, 0), self.changed.get(k, 0)] for k in self.targets},
            "ms": round(self.ms, 1),
        }


class quiet:
    """Within this block the engine's own writes announce nothing (they mark nothing either)."""

    def __init__(self, using: str = "default") -> None:
        self.connection = connections[using]

    def __enter__(self):
        self.previous = getattr(self.connection, QUIET_ATTR, False)
        setattr(self.connection, QUIET_ATTR, True)

    def __exit__(self, *exc):
        setattr(self.connection, QUIET_ATTR, self.previous)


def prepare(cursor, lock_timeout_ms: int | None = None) -> None:
    """Settings for one recompute transaction.

    JIT off: a batch's aggregate is estimated expensive enough to be compiled, and compiling it
    (about 135 ms for 500 capture sets) costs more than running it. The lock timeout, when
    given, bounds the wait for a target row someone else holds.
    """
    timeout = "0" if lock_timeout_ms is None else f"{lock_timeout_ms}ms"
    cursor.execute(
        "SELECT set_config('jit', 'off', true), set_config('lock_timeout', %s, true)", [timeout]
    )


def _take(cursor, batch_size: int, max_ids: int, labels: list[str] | None):
    where = "WHERE target = ANY(%s)" if labels else ""
    params: list = [labels] if labels else []
    cursor.execute(
        f"SELECT id, target, ids FROM {MARK_TABLE} {where} ORDER BY id LIMIT %s"
        " FOR UPDATE SKIP LOCKED",
        [*params, batch_size],
    )
    taken, budget = [], max_ids
    for mark_id, target, ids in cursor.fetchall():
        if taken and ids is not None and len(ids) > budget:
            break
        taken.append((mark_id, target, ids))
        budget -= 1 if ids is None else len(ids)
    if taken:
        cursor.execute(f"DELETE FROM {MARK_TABLE} WHERE id = ANY(%s)", [[m[0] for m in taken]])
    return taken


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


def drain(
    batch_size: int = 500,
    max_ids: int = 5000,
    targets: list[str] | None = None,
    using: str = "default",
    lock_timeout_ms: int = 10_000,
) -> DrainResult:
    """Consume one batch of marks and bring their targets' counts up to date.

    Args:
        batch_size: Most marks taken.
        max_ids: Most target ids recomputed (a single larger mark is still taken whole).
        targets: Only marks for these model labels (all when None).
        lock_timeout_ms: How long to wait for a locked target row before giving up.
    """
    started = time.perf_counter()
    result = DrainResult()
    known = graph().targets
    with transaction.atomic(using=using), quiet(using):
        cursor = connections[using].cursor()
        # A target row locked for long (a stuck admin transaction) fails this batch quickly;
        # the caller retries later and the marks, never deleted, wait.
        prepare(cursor, lock_timeout_ms)
        taken = _take(cursor, batch_size, max_ids, targets)
        result.marks = len(taken)
        plan: dict[str, set[int]] = defaultdict(set)
        for _mark_id, label, ids in taken:
            if label not in known:
                # A model whose counts were removed: its marks mean nothing any more.
                continue
            if ids is None:
                result.expanded[label] = _expand(cursor, label)
            else:
                plan[label].update(ids)
        for label in sorted(plan):
            statement = aggregate.compile_recompute(label, using)
            alive = aggregate.lock(cursor, statement, sorted(plan[label]))
            changes = aggregate.run(cursor, statement, alive, write=True)
            result.targets[label] = len(alive)
            result.changed[label] = len(changes)
    result.ms = (time.perf_counter() - started) * 1000
    return result


def recompute_rows(ids_by_label: dict[str, list[int]], using: str = "default") -> tuple[int, int]:
    """Recompute the given rows now, under the same locks as a drain.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    recomputed = changed = 0
    with transaction.atomic(using=using), quiet(using):
        cursor = connections[using].cursor()
        prepare(cursor)
        for label in sorted(ids_by_label):
            if label not in graph().targets:
                raise UnknownTargetError(label)
            statement = aggregate.compile_recompute(label, using)
            alive = aggregate.lock(cursor, statement, sorted(set(ids_by_label[label])))
            recomputed += len(alive)
            changed += len(aggregate.run(cursor, statement, alive, write=True))
    return recomputed, changed


def pending_ids(label: str, ids: list[int], using: str = "default") -> set[int]:
    """Which of ``ids`` have a mark waiting (an "every row" mark covers them all)."""
    if not ids:
        return set()
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT DISTINCT x FROM {MARK_TABLE} m CROSS JOIN LATERAL"
            f" unnest(coalesce(m.ids, %s::bigint[])) x"
            f" WHERE m.target = %s AND (m.ids IS NULL OR m.ids && %s::bigint[]) AND x = ANY(%s)",
            [ids, label, ids, ids],
        )
        return {row[0] for row in cursor.fetchall()}


def flag_pending(rows: list, using: str = "default") -> None:
    """Set ``counts_pending`` on each row (all of one model) with one query for the lot.

    What list views show as freshness: a page of 25 rows costs one query, not 25.
    """
    if not rows:
        return
    pending = pending_ids(rows[0]._meta.label_lower, [row.pk for row in rows], using)
    for row in rows:
        row.counts_pending = row.pk in pending


@dataclass(frozen=True)
class PendingSummary:
    label: str
    marks: int
    ids: int | None  # None when an "every row" mark is waiting
    oldest_seconds: float


def pending_summary(using: str = "default") -> list[PendingSummary]:
    """Marks waiting per target model, with the age of the oldest."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT target, count(*), CASE WHEN bool_or(ids IS NULL) THEN NULL"
            f" ELSE sum(cardinality(ids)) END,"
            f" extract(epoch FROM now() - min(created_at))"
            f" FROM {MARK_TABLE} GROUP BY target ORDER BY target"
        )
        return [
            PendingSummary(label, marks, None if n is None else int(n), float(age or 0))
            for label, marks, n, age in cursor.fetchall()
        ]


def has_pending(labels: list[str] | None = None, using: str = "default") -> bool:
    with connections[using].cursor() as cursor:
        if labels:
            cursor.execute(
                f"SELECT EXISTS (SELECT 1 FROM {MARK_TABLE} WHERE target = ANY(%s))", [labels]
            )
        else:
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {MARK_TABLE})")
        return cursor.fetchone()[0]


def mark_all(label: str, using: str = "default") -> None:
    """Queue every row of ``label`` for recompute (a backfill the workers carry out)."""
    if label not in graph().targets:
        raise UnknownTargetError(label)
    with connections[using].cursor() as cursor:
        cursor.execute(f"INSERT INTO {MARK_TABLE} (target, ids) VALUES (%s, NULL)", [label])
