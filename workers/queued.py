"""Which target models have a drain message coming, read from the Redis broker's own keys.

The sweep must not send for a model that already has a message queued, delayed or waiting to
be retried: with drains failing, every sweep used to add one more message per model (the actor
frees its debounce key before it drains, so a failing drain leaves no key behind), and they all
ran, uselessly, once the database was back.

Why the broker's keys rather than an "in flight" key of our own: they are the truth about what
will run. A key of ours would have to follow every path a message takes (sent, delayed, fetched,
retried with backoff, dead-lettered, lost with a killed worker) and would lie the moment one
path forgot it; the broker's keys change only with the message itself. What we read:

- ``<ns>:<queue>.msgs`` and ``<ns>:<queue>.DQ.msgs``: every message enqueued, fetched or
  delayed (a retry is a delayed message), until it is acknowledged or dead-lettered;
- ``<ns>:__heartbeats__`` and ``<ns>:__acks__.<worker>.<queue>``: the messages a worker fetched.
  A worker that has not been heard of for ``COUNTS_WORKER_LOST_MS`` is taken for dead; its
  messages count as lost (the broker hands them back only after minutes), so the sweep sends.

Both hashes are read in one MULTI, so a message moving from the delay queue to the queue, or
into the delay queue as a retry, is seen in one of them, never in neither.
"""

from __future__ import annotations

import json
import time

import dramatiq
from django.conf import settings
from dramatiq.common import dq_name

from workers import debounce

#: Actor name -> the argument that names the target model, and how to read a label from it.
_LABEL_ARGUMENT = {
    "recompute_pending": ("key", debounce.label_of),
    "drain_backlog": ("label", lambda label: label if isinstance(label, str) else None),
}


def labels_with_messages() -> set[str]:
    """Labels of the models a live worker, or the queue, still holds a drain message for."""
    from workers.actors import QUEUE

    broker = dramatiq.get_broker()
    r, ns = broker.client, broker.namespace
    queues = (QUEUE, dq_name(QUEUE))
    pipe = r.pipeline(transaction=True)
    pipe.zrangebyscore(f"{ns}:__heartbeats__", 0, _lost_before_ms())
    for queue in queues:
        pipe.hgetall(f"{ns}:{queue}.msgs")
    lost_workers, *messages = pipe.execute()
    labels = set()
    for queue, by_id in zip(queues, messages, strict=True):
        lost = set()
        for worker in lost_workers:
            lost |= r.smembers(f"{ns}:__acks__.{worker.decode()}.{queue}")
        labels.update(
            label
            for message_id, payload in by_id.items()
            if message_id not in lost and (label := label_of_message(payload))
        )
    return labels


def _lost_before_ms() -> int:
    # Heartbeats carry the workers' wall clocks; the margin is far above ordinary clock skew.
    return int(time.time() * 1000) - settings.COUNTS_WORKER_LOST_MS


def label_of_message(payload: bytes) -> str | None:
    """The target model a drain message is for; None for any other message or garbage."""
    try:
        message = json.loads(payload)
        name, read = _LABEL_ARGUMENT[message["actor_name"]]
        args, kwargs = message.get("args") or [], message.get("kwargs") or {}
        return read(args[0] if args else kwargs.get(name))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
