"""Reconcile: walk every target row, recompute, report drift per field, repair it.

Triggers see every write made through SQL. What they cannot see is a database changed with them
switched off: a restore, ``session_replication_role = replica``, a table rebuilt by hand. The
reconcile pass covers that, and its report (zero drift, run after run) is what earns trust.

Rows are visited in keyset-paginated chunks, each in its own short transaction, so a pass over
10⁷ rows never holds a long transaction or a long lock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from counts import aggregate
from counts.apps import graph
from counts.errors import UnknownTargetError
from counts.marks import defer, engine_transaction
from counts.triggers import q


@dataclass
class ModelReport:
    label: str
    checked: int = 0
    drifted_rows: int = 0
    drift: Counter = field(default_factory=Counter)  # field -> rows that were wrong
    examples: list = field(default_factory=list)  # a few Change objects, for the log

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "drift": dict(self.drift),
        }


@dataclass
class ReconcileReport:
    dry_run: bool
    models: dict[str, ModelReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def drifted_rows(self) -> int:
        return sum(m.drifted_rows for m in self.models.values())

    @property
    def checked(self) -> int:
        return sum(m.checked for m in self.models.values())

    def as_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "seconds": round(self.seconds, 3),
            "models": {k: v.as_dict() for k, v in self.models.items()},
        }


def _labels(model) -> list[str]:
    targets = sorted(graph().targets)
    if model is None:
        return targets
    label = model if isinstance(model, str) else model._meta.label_lower
    label = label.lower()
    if label not in targets:
        raise UnknownTargetError(label)
    return [label]


def reconcile(
    model=None,
    dry_run: bool = False,
    chunk: int = 1000,
    progress: Callable[[str, int], None] | None = None,
    using: str = "default",
) -> ReconcileReport:
    """Compare every cached count with the truth and (unless ``dry_run``) repair it.

    Args:
        model: A model class or label to limit the pass to; every target when None.
        dry_run: Report drift without writing.
        chunk: Rows per transaction.
        progress: Called with (label, rows checked so far) after each chunk.
    """
    started = time.perf_counter()
    report = ReconcileReport(dry_run=dry_run)
    for label in _labels(model):
        statement = aggregate.compile_recompute(label, using)
        model_report = report.models[label] = ModelReport(label)
        last = None
        while True:
            with engine_transaction(using) as cursor:
                where = "" if last is None else f"WHERE {q(statement.pk)} > %s"
                cursor.execute(
                    f"SELECT {q(statement.pk)} FROM {q(statement.table)} {where}"
                    f" ORDER BY {q(statement.pk)} LIMIT %s",
                    ([] if last is None else [last]) + [chunk],
                )
                ids = [row[0] for row in cursor.fetchall()]
                if not ids:
                    break
                checked = ids
                if not dry_run:
                    # Rows someone holds are marked for the drain rather than waited for.
                    checked = aggregate.lock(cursor, statement, ids)
                    held = aggregate.held_elsewhere(cursor, statement, ids, checked)
                    if held:
                        defer(cursor, label, held)
                changes = aggregate.run(cursor, statement, checked, write=not dry_run)
            last = ids[-1]
            model_report.checked += len(checked)
            model_report.drifted_rows += len(changes)
            for change in changes:
                model_report.drift.update(change.fields)
            model_report.examples.extend(changes[: max(0, 5 - len(model_report.examples))])
            if progress:
                progress(label, model_report.checked)
    report.seconds = time.perf_counter() - started
    return report
