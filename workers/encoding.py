"""Dead-lettering payloads that are not messages, instead of crashing the consumer on them.

Dramatiq's Redis consumer decodes each payload it fetched; when that raises, the consumer
thread dies (CRITICAL, restarted in 3 s) and the payload stays fetched-but-unacknowledged, to
be redelivered to the next worker and crash it too, forever. The payload carries its own broker
id (``options.redis_message_id``) only when it decodes, so without one nobody can ack or nack it.

:class:`DeadLetteringJSONEncoder` decodes as dramatiq's JSON encoder does; for a payload that is
not a well-formed message it finds the payload's id in the broker's own hash (``<ns>:<queue>.msgs``
for each declared queue, the delay queues included) and returns a stand-in message with that id
for the :func:`~workers.actors.dead_letter` actor. That actor raises ``MalformedMessage`` (in its
``throws``), so the worker logs it once at ERROR and nacks it; the broker's nack script then moves
the original payload, byte for byte, to the dead-letter set (``<queue>.XQ``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import dramatiq

#: The actor that dead-letters a stand-in for an undecodable payload.
DEAD_LETTER_ACTOR = "dead_letter"

#: The fields a message payload must carry, and the type each must have.
_FIELDS = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
}

#: Most bytes of a broken payload quoted in the log line.
_QUOTED = 200


class DeadLetteringJSONEncoder(dramatiq.JSONEncoder):
    """JSON, as dramatiq's default, but a broken payload decodes to a dead-letter stand-in."""

    def decode(self, data: bytes) -> dict:
        try:
            fields = super().decode(data)
            _check(fields)
            return fields
        except Exception as exc:
            stand_in = _stand_in(data, exc)
            if stand_in is None:
                raise
            return stand_in


def _check(fields) -> None:
    """Raise unless ``fields`` can make a ``dramatiq.Message`` the Redis broker can ack."""
    known = {field.name for field in dataclasses.fields(dramatiq.Message)}
    if not isinstance(fields, dict) or not set(_FIELDS) <= set(fields) <= known:
        raise ValueError("not a message: wrong fields")
    for name, kind in _FIELDS.items():
        if not isinstance(fields[name], kind):
            raise ValueError(f"not a message: {name!r} is not a {kind.__name__}")
    if not isinstance(fields["options"].get("redis_message_id"), str):
        raise ValueError("not a message: no redis_message_id")


def _stand_in(data: bytes, exc: Exception) -> dict | None:
    """A message for :data:`DEAD_LETTER_ACTOR` carrying the payload's broker id, if found."""
    found = _find_in_broker(data)
    if found is None:
        return None
    queue_name, redis_message_id = found
    quoted = data[:_QUOTED].decode("utf-8", "replace")
    return {
        "queue_name": queue_name,
        "actor_name": DEAD_LETTER_ACTOR,
        "args": [f"undecodable payload {quoted!r} ({exc})"],
        "kwargs": {},
        "options": {"redis_message_id": redis_message_id},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }


def _find_in_broker(data: bytes) -> tuple[str, str] | None:
    """``(queue, id)`` of a payload in the Redis broker's message hashes, or None."""
    broker = dramatiq.get_broker()
    client, namespace = getattr(broker, "client", None), getattr(broker, "namespace", None)
    if client is None or namespace is None:
        return None
    raw = data if isinstance(data, bytes) else str(data).encode()
    for queue_name in sorted(broker.get_declared_queues() | broker.get_declared_delay_queues()):
        for message_id, payload in client.hscan_iter(f"{namespace}:{queue_name}.msgs"):
            if payload == raw:
                return queue_name, message_id.decode()
    return None
