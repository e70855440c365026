"""countdown's counts engine: exact cached counts from declarations, triggers and drains.

The public API, importable from ``counts``:

- :class:`~counts.fields.CachedCountField` — declare a count (in ``counts.fields``);
- :func:`recompute` — recompute given rows now (admin action, tests);
- :func:`drain` — consume one batch of dirty marks (workers);
- :func:`reconcile` — find and repair drift (scheduler, ``manage.py counts reconcile``);
- :func:`rebuild` — recompute every row of some or all models now, leaving no redundant mark
  (``manage.py counts rebuild``, ``seed_demo``); :func:`target_rows` sizes such a pass;
- :mod:`counts.rest` — list endpoints with counts and freshness, for apps that use DRF.

The life of a mark, one step at a time, in the order to read the modules (``docs/engine.md``
says why each step keeps the counts exact):

1. ``fields`` — the declaration: ``CachedCountField(path, filter=Q(...), distinct=...)``;
   ``checks`` refuses what cannot be kept exact.
2. ``spec`` — each declaration becomes frozen data: chains of hops and the columns it reads.
3. ``modes`` — how each count is kept: *own-row* (the writer records exact amounts), *item*
   (items credited against their ledgers, distinct counts through ``multiplicity``), or *full*.
4. ``graph`` — all specs become routes: which table changes reach which counts (pure).
5. ``triggers`` — statement-level triggers that read only their own rows and write marks
   (pure SQL); ``jobs`` adds one job mark for a changed setting; ``guards`` keeps cached
   columns and keys the engine's; ``operations`` and ``migrations_writer`` put them into
   migrations.
6. ``mark`` — what a mark is: delta, recount, every row, route, item, every item, job
   (``models.DirtyMark``); ``marks`` — the queue as others use it: deferral, pending flags.
7. ``notice`` — after commit, "this transaction wrote these targets", from what each statement
   writes (``statements``); ``workers`` turns it into a debounced message.
8. ``draining`` — a worker's transaction (``engine_transaction``, ``prepared``): take due marks
   and lock their items (``item_locks``); resolve routes (``routes``), expand jobs and
   "every" marks (``item_backfill``); recompute items against their ledgers (``items``,
   ``multiplicity``); write target rows: amounts added (``applying``), marked rows recounted
   (``aggregate``, whose formula ``truth - pending - adjustment`` reads ``stale_items``), rows
   another drain holds waited for briefly in one order (``target_locks``) or put back.

Around them: ``recomputing`` ("Recompute now"), ``reconciling`` (reconcile and rebuild, over
``item_sweep``), ``backfill`` (a new count's, under a lease),
``checkpoints`` (named steps for tests), ``progress`` (bulk passes on stderr), ``status`` (what
operators see), ``admin``, ``admin_change`` and ``rest`` (what users see), ``apps`` (the graph,
sealed at startup), ``signals``, ``names`` and ``errors`` (one hierarchy).

The functions import lazily so that importing ``counts.fields`` from a models module never
pulls in code that needs the app registry.
"""

from __future__ import annotations

from collections import defaultdict


def recompute(rows) -> tuple[int, int]:
    """Recompute the cached counts of a queryset or an iterable of instances, synchronously.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    from counts.recomputing import recompute_rows

    ids: dict[str, list[int]] = defaultdict(list)
    if hasattr(rows, "model") and hasattr(rows, "values_list"):
        ids[rows.model._meta.label_lower] = list(rows.values_list("pk", flat=True))
    else:
        for obj in rows:
            ids[obj._meta.label_lower].append(obj.pk)
    return recompute_rows(dict(ids))


def drain(**options):
    """Consume one batch of dirty marks; see :func:`counts.draining.drain` for the options."""
    from counts.draining import drain as _drain

    return _drain(**options)


def reconcile(model=None, dry_run: bool = False, chunk: int = 5000, progress=None):
    """Find and repair drift; see :func:`counts.reconciling.reconcile`."""
    from counts.reconciling import reconcile as _reconcile

    return _reconcile(model=model, dry_run=dry_run, chunk=chunk, progress=progress)


def rebuild(models=None, chunk: int = 5000, progress=None):
    """Recompute every row of ``models`` (all targets when None) now; see
    :func:`counts.reconciling.rebuild`."""
    from counts.reconciling import rebuild as _rebuild

    return _rebuild(models=models, chunk=chunk, progress=progress)


def target_rows(models=None) -> dict[str, int]:
    """``{label: rows}`` of ``models`` (all targets when None); see
    :func:`counts.reconciling.target_rows`."""
    from counts.reconciling import target_rows as _target_rows

    return _target_rows(models=models)
