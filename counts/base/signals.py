"""Extension points the engine offers to the layers above it.

- ``counts.run.notice.marks_committed``: a transaction that wrote watched tables committed.
- :data:`status_extras`: receivers return a dict merged into ``counts status`` (the workers
  add queue depths), so the engine reports on queues without knowing one.
- :data:`reconciled`: an operator's or the scheduler's reconcile pass finished (not a
  migration's backfill, whose "drift" is the new count being filled in); ``report`` is its
  ``ReconcileReport``. The workers count the drift found, for ``/metrics``.
"""

from django.dispatch import Signal

#: Receivers return a dict of extra status sections, or None.
status_extras = Signal()

#: Sent with ``report=`` (a ``counts.operate.reconciling.ReconcileReport``) by ``counts reconcile``
#: and the periodic reconcile actor.
reconciled = Signal()
