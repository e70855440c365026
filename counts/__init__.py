"""countdown's counts engine: exact cached counts from declarations, triggers and drains.

The public API, importable from ``counts``:

- :class:`~counts.fields.CachedCountField` — declare a count (in ``counts.fields``);
- :func:`recompute` — recompute given rows now (admin action, tests);
- :func:`drain` — consume one batch of dirty marks (workers);
- :func:`reconcile` — find and repair drift (scheduler, ``manage.py counts reconcile``);
- :func:`rebuild` — recompute every row of some or all models now, leaving no redundant mark
  (``manage.py counts rebuild``, ``seed_demo``); :func:`target_rows` sizes such a pass;
- :mod:`counts.rest` — list endpoints with counts and freshness, for apps that use DRF.

The life of a mark, one module per step, in the order to read them:

1. ``fields`` — the declaration: ``CachedCountField(path, filter=Q(...), distinct=...)``.
2. ``spec`` — each declaration becomes frozen data: chains of hops and the columns it reads.
3. ``graph`` — all specs become routes: which table changes reach which targets (pure).
4. ``triggers`` — routes compile to statement-level triggers that write marks (pure SQL);
   ``guards`` adds the triggers that keep cached columns the engine's own; ``operations``
   and ``migrations_writer`` put both into migrations.
5. ``marks`` — the dirty-mark queue (``models.DirtyMark``): what is pending, marking again.
6. ``notice`` — after commit, "this transaction wrote these targets" (``workers`` turns it into
   a debounced message).
7. ``draining`` — a worker's transaction: take marks, lock what is free, recompute, write.
8. ``aggregate`` — the one statement per target model that computes, compares and writes.

Around them: ``reconciling`` (drift found and repaired, rebuilds), ``status`` (what operators
see), ``admin`` and ``rest`` (what users see), ``errors`` (one hierarchy).

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
