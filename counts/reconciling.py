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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.db import connections, transaction

from counts import aggregate, multiplicity
from counts.apps import graph
from counts.engine_transaction import engine_transaction
from counts.errors import UnknownTargetError
from counts.item_backfill import fill_ledgers
from counts.items import kinds_feeding
from counts.recomputing import claim
from counts.triggers import MARK_TABLE, q


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
    #: The ledger audit, per item kind: items whose ledger differed from their truth.
    ledgers: dict[str, ModelReport] = field(default_factory=dict)
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
            "ledgers": {k: v.as_dict() for k, v in self.ledgers.items()},
        }


def _labels(models) -> list[str]:
    """Target labels named by ``models``: None (every target), a model or label, or several."""
    targets = sorted(graph().targets)
    if models is None:
        return targets
    if isinstance(models, str) or not isinstance(models, Iterable):
        models = [models]
    labels = []
    for model in models:
        label = (model if isinstance(model, str) else model._meta.label_lower).lower()
        if label not in targets:
            raise UnknownTargetError(label)
        labels.append(label)
    return sorted(set(labels))


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
    labels = _labels(model)
    # Ledgers first: a target repaired while an item's ledger still drifts would drift again
    # at the item's next change.
    for kind, keys in _ledger_keys(labels).items():
        ledger = ModelReport(kind.mark_target)
        ledger.checked, ledger.drifted_rows = fill_ledgers(
            kind, keys, using=using, chunk=chunk, dry_run=dry_run
        )
        if ledger.drifted_rows:
            ledger.drift["ledger"] = ledger.drifted_rows
        # Then the multiplicities of its distinct counts, which the ledgers add up to.
        for part in kind.parts:
            if part.distinct and part.key in keys:
                with transaction.atomic(using=using), connections[using].cursor() as cursor:
                    pairs = multiplicity.audit(cursor, part.key, kind.mark_target, dry_run)
                if pairs:
                    ledger.drift[f"{part.label}.{part.column} pairs"] = pairs
        report.ledgers[kind.mark_target] = ledger
    for label in labels:
        report.models[label] = _reconcile_model(label, dry_run, chunk, progress, using)
    report.seconds = time.perf_counter() - started
    return report


def _ledger_keys(labels: list[str]) -> dict:
    """``{item kind: ledger keys}`` of the item counts on ``labels``."""
    found: dict = {}
    for label in labels:
        for kind in kinds_feeding(graph(), label):
            found.setdefault(kind, []).extend(p.key for p in kind.parts_for(label))
    return found


def _reconcile_model(label: str, dry_run: bool, chunk: int, progress, using: str) -> ModelReport:
    """One target model's pass, ``chunk`` rows per transaction in id order."""
    statement = aggregate.compile_recompute(label, using)
    model_report = ModelReport(label)
    last = None
    while True:
        with engine_transaction(using) as cursor:
            ids = _next_ids(cursor, statement, last, chunk)
            if not ids:
                break
            checked = ids
            if not dry_run:  # rows someone holds are marked for the drain, not waited for
                checked, _held = claim(cursor, statement, label, ids)
            changes = aggregate.run(cursor, statement, checked, write=not dry_run)
        last = ids[-1]
        model_report.checked += len(checked)
        model_report.drifted_rows += len(changes)
        for change in changes:
            model_report.drift.update(change.fields)
        model_report.examples.extend(changes[: max(0, 5 - len(model_report.examples))])
        if progress:
            progress(label, model_report.checked)
    return model_report


def _next_ids(cursor, statement, last: int | None, chunk: int) -> list[int]:
    """The next ``chunk`` ids after ``last`` (keyset pagination: no offset to walk past)."""
    where = "" if last is None else f"WHERE {q(statement.pk)} > %s"
    cursor.execute(
        f"SELECT {q(statement.pk)} FROM {q(statement.table)} {where}"
        f" ORDER BY {q(statement.pk)} LIMIT %s",
        ([] if last is None else [last]) + [chunk],
    )
    return [row[0] for row in cursor.fetchall()]


def rebuild(
    models=None,
    chunk: int = 1000,
    progress: Callable[[str, int], None] | None = None,
    using: str = "default",
) -> ReconcileReport:
    """Recompute every row of ``models`` now, dropping the marks the pass makes redundant.

    First the ledgers of the items feeding these models are set to the items' truth, then the
    marks for these models (and their items) that were committed when the pass started are
    deleted, then a repairing :func:`reconcile` recounts every row: the pass reads every row
    and item after those marks were committed, so it covers them. Marks written meanwhile (by
    writers, or for rows someone held) stay for the workers, and the recount's formula counts
    them as pending.

    Args:
        models: A model, a label, or several; every target when None.
        chunk: Rows per transaction.
        progress: Called with (label, rows checked so far) after each chunk.
    """
    labels = _labels(models)
    # Item kinds whose every count is rebuilt here: their ledgers are refilled from the truth,
    # so their item marks are covered too. (A kind feeding other models as well keeps its
    # marks; the recount's formula accounts for them.)
    kinds = _ledger_keys(labels)
    whole = [k.mark_target for k in kinds if {p.label for p in k.parts} <= set(labels)]
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT id FROM {MARK_TABLE} WHERE target = ANY(%s)", [labels + whole])
        covered = [row[0] for row in cursor.fetchall()]
    started = time.perf_counter()
    for kind, keys in kinds.items():
        fill_ledgers(kind, keys, using=using, chunk=chunk)
    # Amounts still queued for these rows are part of the truth the recount reads: drop them
    # first, or the recount would subtract them as pending and nothing would add them back.
    with connections[using].cursor() as cursor:
        cursor.execute(f"DELETE FROM {MARK_TABLE} WHERE id = ANY(%s)", [covered])
    report = ReconcileReport(dry_run=False)
    for label in labels:
        report.models[label] = _reconcile_model(label, False, chunk, progress, using)
    report.seconds = time.perf_counter() - started
    return report


def target_rows(models=None, using: str = "default") -> dict[str, int]:
    """``{label: rows in its table now}`` for ``models`` (every target when None): the length
    of a :func:`rebuild` or :func:`reconcile` pass, e.g. for a progress bar."""
    rows = {}
    with connections[using].cursor() as cursor:
        for label in _labels(models):
            cursor.execute(f"SELECT count(*) FROM {q(graph().targets[label].db_table)}")
            rows[label] = cursor.fetchone()[0]
    return rows
