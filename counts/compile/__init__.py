"""SQL text: pure functions of the graph (mark triggers, guards, item and stale-item SQL).

Tested as text (``tests/counts/compile``); executed only by the layers above.
"""
