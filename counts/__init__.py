"""countdown's counts engine: exact cached counts from declarations, triggers and drains.

The public API is ``counts.api``; these names are also served lazily from ``counts`` itself:

- ``counts.fields.CachedCountField`` — declare a count;
- :func:`recompute` — recompute given rows now (admin action, tests);
- :func:`drain` — consume one batch of dirty marks (workers);
- :func:`exact` — a page of rows with every count exact in this snapshot, before any drain
  (list endpoints and the admin read through it);
- :func:`reconcile` — find and repair drift (scheduler, ``manage.py counts reconcile``);
- :func:`rebuild` — recompute every row of some or all models now, leaving no redundant mark
  (``manage.py counts rebuild``, ``seed_demo``); :func:`target_rows` sizes such a pass;
- ``counts.surfaces.rest`` — list endpoints with counts and freshness, for apps that use DRF.

The package's folders are its layers, each importing only the ones below it
(``pyproject.toml``'s ``[tool.importlinter]``; ``docs/engine.md`` §7):

- ``base`` — names and SQL quoting, what a mark means (``mark``), errors, checkpoints;
- ``declare`` — a declaration (``field``, refused by ``checks``) becomes a spec (``spec``,
  ``resolve``), is kept own-row, through items or in full (``modes``, ``classify``), and all of
  them a graph (``graph``) with its item kinds (``kinds``) and jobs (``jobs``);
- ``compile`` — SQL text: mark triggers reading only their own rows (``triggers``,
  ``trigger_rows``), guards keeping cached columns the engine's (``guards``), items' truth and
  ledgers (``item_sql``), what waiting items mean for a recount (``stale_items``);
- ``run`` — the queue (``marks``), the after-commit notice (``notice``), exact reads
  (``exact``), and the drain
  (``draining``): take marks and lock items (``item_locks``), credit items against their
  ledgers (``items``, ``multiplicity``), write targets (``applying``, ``aggregate``,
  ``target_locks``), all in ``engine_transaction``;
- ``operate`` — "Recompute now" (``recomputing``), reconcile and rebuild (``reconciling``,
  ``item_sweep``), a new count's backfill (``backfill``), ``progress``, ``status``;
- ``surfaces`` — the admin change page, DRF support, installing trigger migrations.

``docs/engine.md`` says why each step keeps the counts exact.
"""

from __future__ import annotations

_PUBLIC = frozenset(
    {"drain", "exact", "rebuild", "recompute", "recompute_rows", "reconcile", "target_rows"}
)


def __getattr__(name: str):
    """``counts.drain`` and the others, loaded on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'counts' has no attribute {name!r}")
    # Function-local on purpose: this package is imported while Django loads its apps, before
    # the engine's modules may be (they read models and the app registry).
    from counts import api

    return getattr(api, name)
