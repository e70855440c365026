"""countdown's counts engine: exact cached counts from declarations, triggers and drains.

The public API, importable from ``counts``:

- :class:`~counts.declare.field.CachedCountField` — declare a count (in ``counts.declare.field``);
- :func:`recompute` — recompute given rows now (admin action, tests);
- :func:`drain` — consume one batch of dirty marks (workers);
- :func:`reconcile` — find and repair drift (scheduler, ``manage.py counts reconcile``);
- :func:`rebuild` — recompute every row of some or all models now, leaving no redundant mark
  (``manage.py counts rebuild``, ``seed_demo``); :func:`target_rows` sizes such a pass;
- :mod:`counts.surfaces.rest` — list endpoints with counts and freshness, for apps that use DRF.

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

The functions import lazily so that importing ``counts.declare.field`` from a models module never
pulls in code that needs the app registry.
"""

from __future__ import annotations

_PUBLIC = frozenset({"drain", "rebuild", "recompute", "recompute_rows", "reconcile", "target_rows"})


def __getattr__(name: str):
    """``counts.drain`` and the others, loaded on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'counts' has no attribute {name!r}")
    # Function-local on purpose: this package is imported while Django loads its apps, before
    # the engine's modules may be (they read models and the app registry).
    from counts import api

    return getattr(api, name)
