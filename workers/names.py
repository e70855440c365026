"""The names workers and the broker agree on: the queue and the drain message's actor.

Below every other workers module, so that sending a message (``workers.debounce``) and reading
the broker's keys (``workers.queued``) need not import the actors that consume them.
"""

#: The Dramatiq queue every counts message goes to.
QUEUE = "counts"
#: The actor a debounced drain message names (``workers.actors.recompute_pending``).
RECOMPUTE_ACTOR = "recompute_pending"
