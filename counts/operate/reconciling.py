"""Reconcile: walk every target row, recompute, report drift per field, repair it.

Triggers see every write made through SQL. What they cannot see is a database changed with them
switched off: a restore, ``session_replication_role = replica``, a table rebuilt by hand. The
reconcile pass covers that, and its report (zero drift, run after run) is what earns trust.

Rows are visited in keyset-paginated chunks, each in its own short transaction, so a pass over
10⁷ rows never holds a long transaction or a long lock.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.db import connections, transaction

from counts.base.errors import UnknownTargetError
from counts.base.mark import Kind, where
from counts.base.names import MARK_TABLE, q
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import kinds_feeding
from counts.operate import item_sweep, parallel, target_pass
from counts.operate.target_pass import ModelReport
from counts.run import multiplicity
from counts.run.draining import drain
from counts.run.engine_transaction import engine_transaction

#: Most target rows (and items) one transaction of a pass takes, by default.
CHUNK = 5000
#: Most drain batches a rebuild on several connections runs at its end (see :func:`rebuild`):
#: enough for what its slices deferred, not an endless chase of writers' marks.
DRAIN_BATCHES = 100
#: ``work_mem`` of the multiplicity audit of a pass on several connections (see
#: :func:`_audit_pairs`).
AUDIT_WORK_MEM = "64MB"


@dataclass
class LedgerReport:
    """The item pass over one item kind: items whose ledger differed from their truth, and
    multiplicity pairs that differed from their ledgers."""

    kind: str
    checked: int = 0
    drifted_rows: int = 0
    held: int = 0
    drift: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "held": self.held,
            "drift": dict(self.drift),
        }


@dataclass
class ReconcileReport:
    dry_run: bool
    models: dict[str, ModelReport] = field(default_factory=dict)
    #: The item pass, per item kind.
    ledgers: dict[str, LedgerReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def drifted_rows(self) -> int:
        return sum(m.drifted_rows for m in self.models.values())

    @property
    def checked(self) -> int:
        return sum(m.checked for m in self.models.values())

    def model(self, label: str) -> ModelReport:
        return self.models.setdefault(label, ModelReport(label))

    def as_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "seconds": round(self.seconds, 3),
            "models": {k: v.as_dict() for k, v in self.models.items()},
            "ledgers": {k: v.as_dict() for k, v in self.ledgers.items()},
        }


def _labels(graph: Graph, models) -> list[str]:
    """Target labels named by ``models``: None (every target), a model or label, or several."""
    targets = sorted(graph.targets)
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
    chunk: int = CHUNK,
    progress: Callable[[str, int], None] | None = None,
    using: str = "default",
    graph: Graph | None = None,
    jobs: int = 1,
) -> ReconcileReport:
    """Compare every cached count with the truth and (unless ``dry_run``) repair it.

    Two passes, each chunk in its own short transaction that keeps invariants I, J and M at
    its commit, so the pass may be stopped anywhere. First the **items** of every kind feeding
    these models, as drains would recompute them (``counts.operate.item_sweep``), then their
    distinct counts' multiplicities; what repairing them credits is credited as a drain would,
    and the target rows that items which drifted (differed with no mark waiting) credit are
    reported as drift. Then the **targets**, each row recounted by
    the formula (``counts.run.aggregate``) and written where it differs. Ledgers go first: a
    target repaired while an item's ledger still drifts would drift again at its next change.

    Args:
        model: A model class or label (or several) to limit the pass to; every target when None.
        dry_run: Report drift without writing or locking anything.
        chunk: Most target rows, and items, per transaction (fewer when rows are costly:
            :data:`BUDGET_S`).
        progress: Called with (label or item kind, rows checked so far) after each chunk.
        graph: The counts to reconcile; the app's (``app_graph()``) when None.
        jobs: Connections to run the pass on: each item kind and each model is cut into
            ``jobs`` key ranges run side by side (``counts.operate.parallel``); one inside a
            transaction of the caller's, whose writes the others could not see.
    """
    graph = graph or app_graph()
    started = time.perf_counter()
    report = ReconcileReport(dry_run=dry_run)
    labels = _labels(graph, model)
    jobs = _jobs(jobs, using)
    _items_pass(graph, report, labels, dry_run, chunk, progress, using, jobs=jobs)
    _targets_pass(graph, report, labels, dry_run, chunk, progress, using, jobs)
    report.seconds = time.perf_counter() - started
    return report


def _jobs(jobs: int, using: str) -> int:
    """The connections a pass may run on: ``jobs``, but one inside a caller's transaction
    (other connections would not see what it has not committed yet; a test's, a script's)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    return 1 if connections[using].in_atomic_block else jobs


def _items_pass(
    graph: Graph,
    report: ReconcileReport,
    labels,
    dry_run,
    chunk,
    progress,
    using,
    lock_all=False,
    jobs=1,
) -> None:
    """Sweep the items feeding ``labels`` and audit their multiplicities (see
    :func:`reconcile`), reporting the target cells the repairs credit. With several ``jobs``,
    every kind's slices side by side, then the audits (each reads a kind's ledgers whole)."""
    kinds = _ledger_keys(graph, labels)
    options = {"dry_run": dry_run, "lock_all": lock_all, "chunk": chunk, "using": using}
    if jobs > 1:
        swept = parallel.sweep_kinds(graph, kinds, options, progress, jobs)
        audits = parallel.Slices(jobs, None, using).run(
            (kind.mark_target, _auditor(graph, kind, keys, dry_run, swept[kind], using, True))
            for kind, keys in kinds.items()
        )
        for (kind, keys), pairs in zip(kinds.items(), audits, strict=True):
            _record(graph, report, labels, kind, keys, swept[kind], pairs)
        return
    for kind, keys in kinds.items():
        found = item_sweep.sweep_keys(graph, kind, keys, progress=progress, **options)
        pairs = _auditor(graph, kind, keys, dry_run, found, using)(None)
        _record(graph, report, labels, kind, keys, found, pairs)


def _auditor(graph: Graph, kind, keys, dry_run: bool, swept, using: str, wide=False):
    """``run(progress)``: the multiplicity audit of ``kind``'s distinct counts among ``keys``
    (:func:`_audit_pairs`, its credits added to the sweep's), pairs that differed per key."""

    def run(_progress) -> Counter:
        distinct = [p for p in kind.parts if p.distinct and p.key in keys]
        if not distinct:
            return Counter()
        return _audit_pairs(graph, kind, distinct, dry_run, swept.credits, using, wide)

    return run


def _record(graph: Graph, report, labels, kind, keys, swept, pairs: Counter) -> None:
    """Enter one kind's sweep and multiplicity audit in ``report``: its ledger drift, and the
    target cells its repairs credited."""
    names = {(s.target.label, s.column): s.name for s in graph.specs}
    ledger = report.ledgers[kind.mark_target] = LedgerReport(
        kind.mark_target, swept.checked, swept.differed, swept.held
    )
    if swept.differed:
        ledger.drift["ledger"] = swept.differed
    for part in kind.parts:
        if part.distinct and part.key in keys and pairs[part.key]:
            ledger.drift[f"{part.label}.{part.column} pairs"] = pairs[part.key]
    for (label, column, target_id), amount in swept.credits.items():
        if amount and label in labels:
            report.model(label).cells[target_id].add(names.get((label, column), column))


def _targets_pass(
    graph: Graph, report, labels, dry_run, chunk, progress, using, jobs, claim_all=(), drift=False
) -> None:
    """Recount every row of ``labels`` (``counts.operate.target_pass``), each model cut into
    ``jobs`` key ranges run side by side when ``jobs`` > 1. ``claim_all``: the labels whose
    every row is claimed; ``drift``: rows are expected drifted (a rebuild)."""
    options = {"dry_run": dry_run, "chunk": chunk, "using": using, "expect_drift": drift}
    if jobs > 1:
        for part in parallel.recount_models(graph, labels, options, claim_all, progress, jobs):
            whole = report.model(part.label)
            whole.checked += part.checked
            for pk, fields in part.cells.items():
                whole.cells[pk].update(fields)
            whole.examples.extend(part.examples[: max(0, 5 - len(whole.examples))])
        return
    for label in labels:
        target_pass.recount_model(
            graph,
            report.model(label),
            options["dry_run"],
            chunk,
            progress,
            using,
            label in claim_all,
            expect_drift=drift,
        )


def _audit_pairs(
    graph: Graph, kind, parts, dry_run: bool, credits, using: str, wide: bool = False
) -> Counter:
    """Bring the multiplicities of ``parts`` (distinct counts fed by ``kind``) back to the sums
    of the ledgers (invariant M), crediting the pairs that cross zero (into ``credits`` too);
    returns the pairs that differed, per ledger key. One transaction, one read of the ledgers.

    ``wide`` (a pass told it may use more of the server: ``jobs`` > 1): the read of every
    ledger runs with PostgreSQL's parallel workers and room to group in memory. It is one
    statement a pass, not a chunk's, so their start-up is nothing beside it; at 10^6 it groups
    378,758 pairs the planner expects to be 400, and spilled to disk under the default
    ``work_mem``: 5.5 s, 3.3 s with both (measured side by side, twice)."""
    keys = [part.key for part in parts]
    with engine_transaction(using) as cursor:
        if wide:
            cursor.execute(
                "SELECT set_config('work_mem', %s, true),"
                " set_config('max_parallel_workers_per_gather', '2', true)",
                [AUDIT_WORK_MEM],
            )
        pairs = multiplicity.drift(cursor, keys, kind.mark_target)
        if wide:  # the statements that follow are small, as the engine's are
            cursor.execute("SELECT set_config('max_parallel_workers_per_gather', '0', true)")
        found: dict = defaultdict(int)
        if dry_run:
            multiplicity.preview(cursor, pairs, kind.parts_by_key, found)
        else:
            multiplicity.add(cursor, pairs, kind.parts_by_key, found)
            cursor.execute(
                f"DELETE FROM {multiplicity.TABLE} WHERE key = ANY(%s) AND n = 0", [keys]
            )
            item_sweep.apply_credits(cursor, graph, found, using)
    for key, amount in found.items():
        credits[key] += amount
    return Counter(key for key, _target, _value in pairs)


def _ledger_keys(graph: Graph, labels: list[str]) -> dict:
    """``{item kind: ledger keys}`` of the item counts on ``labels``."""
    found: dict = {}
    for label in labels:
        for kind in kinds_feeding(graph, label):
            found.setdefault(kind, []).extend(kind.keys_for(label))
    return found


def rebuild(
    models=None,
    chunk: int = CHUNK,
    progress: Callable[[str, int], None] | None = None,
    using: str = "default",
    graph: Graph | None = None,
    jobs: int = 1,
) -> ReconcileReport:
    """Recompute every row of ``models`` now, dropping the marks the pass makes redundant.

    A repairing :func:`reconcile` (every item feeding these models brought to its truth, every
    row recounted), then the marks that were already committed when it started are deleted
    where the pass covered them: recounts of these models' rows, and item and job marks of
    the item kinds whose every count is rebuilt here (each of their items was locked and read
    after the mark committed; the items someone held were marked again). Amounts queued for
    these rows (delta marks) stay: the recount's formula counts them as pending, and the
    workers add them. Marks written meanwhile stay for the workers.

    Args:
        models: A model, a label, or several; every target when None.
        chunk: Rows per transaction.
        progress: Called with (label, rows checked so far) after each chunk.
        graph: The counts to rebuild; the app's (``app_graph()``) when None.
        jobs: Connections to run the pass on (see :func:`reconcile`).
    """
    graph = graph or app_graph()
    labels = _labels(graph, models)
    jobs = _jobs(jobs, using)
    kinds = _ledger_keys(graph, labels)
    whole = [k.mark_target for k in kinds if {p.label for p in k.parts} <= set(labels)]
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT id, target FROM {MARK_TABLE} m WHERE m.target = ANY(%s)"
            f" AND NOT {where(Kind.DELTA)}",
            [labels],
        )
        found = cursor.fetchall()
        rows = [mark_id for mark_id, _target in found]
        marked = {target for _mark_id, target in found}
        cursor.execute(f"SELECT id FROM {MARK_TABLE} m WHERE m.target = ANY(%s)", [whole])
        items = [row[0] for row in cursor.fetchall()]
    started = time.perf_counter()
    report = ReconcileReport(dry_run=False)
    _items_pass(graph, report, labels, False, chunk, progress, using, lock_all=True, jobs=jobs)
    # The item marks go as soon as the items are swept, before the targets are recounted: the
    # recount's formula reads every item a waiting mark names (a load's marks name them all,
    # and a station's recount then read millions of items: minutes a row at 10^7).
    _drop(items, using)
    # Every row claimed only where marks will be dropped (only a lock attempt finds a row a
    # drain is still writing); a model with none is recounted as reconcile does, comparing
    # first and claiming what differs (a million captures locked for nothing: 31 s), but
    # with its costly rows expected drifted: claimed first, recounted once.
    _targets_pass(graph, report, labels, False, chunk, progress, using, jobs, marked, drift=True)
    _drop(rows, using)
    if jobs > 1:
        _add_deferred(graph, labels, using)
    report.seconds = time.perf_counter() - started
    return report


def _add_deferred(graph: Graph, labels: list[str], using: str) -> None:
    """Drain the marks of ``labels``: a rebuild's slices credit the same target rows (a
    station, a capture set) and, like drains, hand a row another slice holds to the queue as
    a DELTA mark (3 in a rebuild at 10^6). A rebuild is asked for when counts must be right
    now, workers running or not, so those amounts are added before it returns, with whatever
    else waits for these models (at most :data:`DRAIN_BATCHES` batches)."""
    for _ in range(DRAIN_BATCHES):
        if drain(targets=labels, using=using, graph=graph).empty:
            return


def _drop(covered: list[int], using: str) -> None:
    """Delete the marks ``covered`` by a finished pass; a drain holding one keeps it."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {MARK_TABLE} WHERE id IN (SELECT id FROM {MARK_TABLE}"
            " WHERE id = ANY(%s) FOR UPDATE SKIP LOCKED)",
            [covered],
        )


def target_rows(models=None, using: str = "default", graph: Graph | None = None) -> dict[str, int]:
    """``{label: rows in its table now}`` for ``models`` (every target when None): the length
    of a :func:`rebuild` or :func:`reconcile` pass, e.g. for a progress bar."""
    graph = graph or app_graph()
    rows = {}
    with connections[using].cursor() as cursor:
        for label in _labels(graph, models):
            cursor.execute(f"SELECT count(*) FROM {q(graph.targets[label].db_table)}")
            rows[label] = cursor.fetchone()[0]
    return rows
