"""countdown's counts engine: exact cached counts from declarations, triggers and drains.

The public API, importable from ``counts``:

- :class:`~counts.fields.CachedCountField` — declare a count (in ``counts.fields``);
- :func:`recompute` — recompute given rows now (admin action, tests);
- :func:`drain` — consume one batch of dirty marks (workers);
- :func:`reconcile` — find and repair drift (scheduler, ``manage.py counts reconcile``);
- :func:`rebuild` — recompute every row of some or all models now, leaving no redundant mark
  (``manage.py counts rebuild``, ``seed_demo``); :func:`target_rows` sizes such a pass;
- :mod:`counts.rest` — list endpoints with counts and freshness, for apps that use DRF.

The functions import lazily so that importing ``counts.fields`` from a models module never
pulls in code that needs the app registry (``reconcile`` is the exception; see below).
"""

from __future__ import annotations

from collections import defaultdict


def recompute(rows) -> tuple[int, int]:
    """Recompute the cached counts of a queryset or an iterable of instances, synchronously.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    from counts.marks import recompute_rows

    ids: dict[str, list[int]] = defaultdict(list)
    if hasattr(rows, "model") and hasattr(rows, "values_list"):
        ids[rows.model._meta.label_lower] = list(rows.values_list("pk", flat=True))
    else:
        for obj in rows:
            ids[obj._meta.label_lower].append(obj.pk)
    return recompute_rows(dict(ids))


def drain(batch_size: int = 500, max_ids: int = 5000, targets=None):
    """Consume one batch of dirty marks; see :func:`counts.marks.drain`."""
    from counts.marks import drain as _drain

    return _drain(batch_size=batch_size, max_ids=max_ids, targets=targets)


# The submodule shares this function's name, and the first import of a submodule sets it as an
# attribute of its package: imported lazily, it would replace ``counts.reconcile`` (the function)
# with the module, and every later ``counts.reconcile()`` would raise TypeError. Importing it
# here, before the function is defined, lets the function win. It needs no app registry.
from counts import reconcile as _reconcile_module  # noqa: E402


def reconcile(model=None, dry_run: bool = False, chunk: int = 1000, progress=None):
    """Find and repair drift; see :func:`counts.reconcile.reconcile`."""
    return _reconcile_module.reconcile(model=model, dry_run=dry_run, chunk=chunk, progress=progress)


def rebuild(models=None, chunk: int = 1000, progress=None):
    """Recompute every row of ``models`` (all targets when None) now; see
    :func:`counts.reconcile.rebuild`."""
    return _reconcile_module.rebuild(models=models, chunk=chunk, progress=progress)


def target_rows(models=None) -> dict[str, int]:
    """``{label: rows}`` of ``models`` (all targets when None); see
    :func:`counts.reconcile.target_rows`."""
    return _reconcile_module.target_rows(models=models)
