"""Which drain messages the Redis broker holds, and where, read from its own keys.

The sweep reads them for one purpose only: not to add a message for fresh marks while one is
already queued, delayed or waiting for a retry (with drains failing, every sweep used to add
one more message per model, and they all ran, uselessly, once the database was back). They are
not trusted for more than that. A message the broker says a live worker fetched may never run:
a fetch sent just before Redis froze is executed by Redis after it thaws, after the client gave
up on the reply, and the message sits in that worker's ack set for as long as the worker lives.
So whether a model's counts are stale is judged in PostgreSQL (``workers.schedule``), and
:class:`Held` says who holds what so that the sweep can name a worker that lost messages.

What we read:

- ``<ns>:<queue>.msgs`` and ``<ns>:<queue>.DQ.msgs``: every message enqueued, fetched or
  delayed (a retry is a delayed message), until it is acknowledged or dead-lettered;
- ``<ns>:__heartbeats__`` and ``<ns>:__acks__.<worker>.<queue>``: the messages each worker
  fetched. A worker not heard of for ``COUNTS_WORKER_LOST_MS`` is taken for dead (``lost``).

Both hashes are read in one MULTI, so a message moving from the delay queue to the queue, or
into the delay queue as a retry, is seen in one of them, never in neither.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import dramatiq
import redis
from django.conf import settings
from dramatiq.common import dq_name

from workers import debounce
from workers.names import QUEUE


def _plain(label) -> str | None:
    return label if isinstance(label, str) else None


#: Actor name -> the argument that names the target model, and how to read a label from it.
_LABEL_ARGUMENT = {
    "recompute_pending": ("key", debounce.label_of),
    "drain_backlog": ("label", _plain),
    "rescue_drain": ("label", _plain),
}


@dataclass(frozen=True)
class Held:
    """A drain message the broker holds: waiting in a queue, or fetched by a worker."""

    label: str
    message_id: str
    actor: str
    #: The broker id of the worker that fetched it; None while it waits in the queue.
    worker: str | None
    #: That worker has not been heard of for ``COUNTS_WORKER_LOST_MS``.
    lost: bool = False
    #: Wall-clock ms before which a delayed message (a debounce, a retry's backoff) is not run.
    eta_ms: int = 0


def held_messages() -> list[Held]:
    """Every drain message the broker holds, with the worker (if any) that fetched it."""
    broker = dramatiq.get_broker()
    r, ns = broker.client, broker.namespace
    queues = (QUEUE, dq_name(QUEUE))
    pipe = r.pipeline(transaction=True)
    pipe.zrangebyscore(f"{ns}:__heartbeats__", "-inf", "+inf", withscores=True)
    for queue in queues:
        pipe.hgetall(f"{ns}:{queue}.msgs")
    workers, *messages = pipe.execute()
    lost_before = _lost_before_ms()
    # Every worker's ack sets in one more round trip (the sweep reads them every few seconds).
    pipe = r.pipeline(transaction=False)
    owners = []
    for worker, seen_ms in workers:
        for queue in queues:
            pipe.smembers(f"{ns}:__acks__.{worker.decode()}.{queue}")
            owners.append((worker.decode(), seen_ms < lost_before))
    fetched: dict[bytes, tuple[str, bool]] = {}
    for owner, acked in zip(owners, pipe.execute() if owners else [], strict=True):
        fetched.update(dict.fromkeys(acked, owner))
    held = []
    for by_id in messages:
        for message_id, payload in by_id.items():
            actor, label, eta_ms, dramatiq_id = _decode(payload)
            if label:
                worker, lost = fetched.get(message_id, (None, False))
                held.append(Held(label, dramatiq_id, actor, worker, lost, eta_ms))
    return held


def _lost_before_ms() -> int:
    # Heartbeats carry the workers' wall clocks; the margin is far above ordinary clock skew.
    return int(time.time() * 1000) - settings.COUNTS_WORKER_LOST_MS


def label_of_message(payload: bytes) -> str | None:
    """The target model a drain message is for; None for any other message or garbage."""
    return _decode(payload)[1]


def _decode(payload: bytes) -> tuple[str, str | None, int, str]:
    """(actor name, target model, eta ms or 0, message id) of a drain message; ("", None, 0,
    "") for anything else. The id is Dramatiq's, the one workers log (the broker keys its
    hashes by an id of its own)."""
    try:
        message = json.loads(payload)
        actor = message["actor_name"]
        name, read = _LABEL_ARGUMENT[actor]
        args, kwargs = message.get("args") or [], message.get("kwargs") or {}
        eta = (message.get("options") or {}).get("eta") or 0
        label = read(args[0] if args else kwargs.get(name))
        return actor, label, int(eta), str(message.get("message_id", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return "", None, 0, ""


def queue_sizes() -> dict[str, int]:
    """Messages of the counts queue by state, read from the Redis broker's own keys.

    ``pending`` counts enqueued and running messages, ``delayed`` the debounced ones waiting
    for their time, ``dead`` the dead-lettered ones.
    """
    broker = dramatiq.get_broker()
    r, ns = broker.client, getattr(broker, "namespace", "dramatiq")
    return {
        "ready": r.llen(f"{ns}:{QUEUE}"),
        "pending": r.hlen(f"{ns}:{QUEUE}.msgs"),
        "delayed": r.hlen(f"{ns}:{QUEUE}.DQ.msgs"),
        "dead": r.zcard(f"{ns}:{QUEUE}.XQ"),
    }


def queue_depths(sender, **kwargs) -> dict:
    """Queue depths for ``counts status`` (ready, delayed, dead-lettered)."""
    try:
        sizes = queue_sizes()
    except redis.RedisError as exc:
        return {"queues": {"redis unavailable": str(exc)}}
    return {
        "queues": {
            f"{QUEUE} (ready)": sizes["ready"],
            f"{QUEUE} (enqueued or running)": sizes["pending"],
            f"{QUEUE} (delayed)": sizes["delayed"],
            f"{QUEUE} (dead letters)": sizes["dead"],
        }
    }
