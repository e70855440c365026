"""Extension points the engine offers to the layers above it.

- ``counts.capture.marks_committed``: a transaction that wrote watched tables committed.
- :data:`status_extras`: receivers return a dict merged into ``counts status`` (the workers
  add queue depths), so the engine reports on queues without knowing one.
"""

from django.dispatch import Signal

#: Receivers return a dict of extra status sections, or None.
status_extras = Signal()
