"""The write path's side: after commit, turn the engine's notice into a debounced message.

Redis being down must not fail or slow a write: the marks are already committed and the
scheduler's sweep will send for them once Redis is back. The error is logged once per outage,
not once per write.
"""

from __future__ import annotations

import logging

import redis

from workers import debounce

logger = logging.getLogger(__name__)

_outage = {"logged": False}


def on_marks_committed(sender, targets, using, **kwargs) -> None:
    try:
        debounce.request(targets)
    except redis.RedisError as exc:
        if not _outage["logged"]:
            _outage["logged"] = True
            logger.error(
                "could not schedule recompute for %s (marks are safe; the sweep will send): %s",
                sorted(targets),
                exc,
            )
        return
    if _outage["logged"]:
        _outage["logged"] = False
        logger.warning("redis is back; recompute messages flow again")


def queue_depths(sender, **kwargs) -> dict:
    """Queue depths for ``counts status`` (ready, delayed, dead-lettered)."""
    import dramatiq

    from workers.actors import QUEUE

    broker = dramatiq.get_broker()
    ns = getattr(broker, "namespace", "dramatiq")
    try:
        r = broker.client
        return {
            "queues": {
                f"{QUEUE} (ready)": r.llen(f"{ns}:{QUEUE}"),
                f"{QUEUE} (enqueued or running)": r.hlen(f"{ns}:{QUEUE}.msgs"),
                f"{QUEUE} (delayed)": r.hlen(f"{ns}:{QUEUE}.DQ.msgs"),
                f"{QUEUE} (dead letters)": r.zcard(f"{ns}:{QUEUE}.XQ"),
            }
        }
    except redis.RedisError as exc:
        return {"queues": {"redis unavailable": str(exc)}}
