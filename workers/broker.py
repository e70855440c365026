"""The Redis broker, and the messages a worker's consumer loses across a Redis stall, put back.

Dramatiq's Redis broker moves a message from a queue to the fetching worker's ack set inside
the same script that returns it. When Redis freezes (a long fork, a failover, a network stall),
a fetch sent just before is executed by Redis after it thaws, after the client gave up on the
reply: the messages sit in that worker's ack set, and no thread of the worker has them. The
consumer thread also drops what it held in memory when it restarts after a connection error
(its delayed messages, the rest of its prefetch). The broker frees such messages only when the
worker's heartbeat stops, so a live worker keeps them, unrun, for as long as it lives; a
debounced drain among them is a model whose counts stay stale until the scheduler's rescue.

:class:`RedisBroker` closes that hole in the process that lost them, where it can be known
exactly which messages it holds. After any broker command of this process fails, each queue's
next successful fetch compares the queue's ack set for this worker with what the worker holds
(its work queue, the consumer thread's delayed messages, the messages being run or waiting
for their ack, the fetch's own result) and puts the difference back on the queue, naming each
message in the log. A message put back that was in hand after all (a race of a few
instructions between a worker thread taking it and starting it) runs twice; drains are
idempotent, and the ack script ignores an id that is no longer in the ack set. An ack whose
reply is lost is retried until Redis answers, as dramatiq retries one whose connection broke
(:data:`_SETTLING`), instead of leaving a message that has run in the ack set for good.

Dramatiq's worker internals read here (``Worker.work_queue``, ``Worker.consumers``, a consumer
thread's ``delay_queue``, ``_RedisConsumer.message_cache``) are those of dramatiq 2.x; should
they change, nothing is put back and one line says so (the scheduler's rescue still bounds the
staleness, ``workers.schedule``).
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from dramatiq.brokers import redis as dramatiq_redis
from dramatiq.common import dq_name

logger = logging.getLogger("workers.broker")

#: Commands that settle a message that has run. Dramatiq retries one that fails with a
#: ``ConnectionError`` until Redis answers, but gives up on a ``TimeoutError`` (a reply lost in
#: a stall): the message stays in the ack set, run, never settled, and is run again only when
#: the worker restarts. Both commands are idempotent (they act only on an id still in the ack
#: set), so a timeout is raised as the error dramatiq retries.
_SETTLING = ("ack", "nack")


class RedisBroker(dramatiq_redis.RedisBroker):
    """Dramatiq's Redis broker that puts back the messages its worker's consumers lost."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        #: The worker of this process, once it boots (web processes have none).
        self._worker = None
        #: Broker ids of the messages being run or waiting for their ack, fetched from any queue.
        self._in_hand: set[str] = set()
        #: Queues whose ack set may hold messages this process never received or dropped.
        self._doubtful: set[str] = set()
        self._warned_internals = False

    # Signals: which messages the worker threads hold, and the worker itself.

    def emit_before(self, signal: str, *args, **kwargs) -> None:
        if signal == "process_message":
            with self._lock:
                self._in_hand.add(_broker_id(args[0]))
        super().emit_before(signal, *args, **kwargs)

    def emit_after(self, signal: str, *args, **kwargs) -> None:
        super().emit_after(signal, *args, **kwargs)
        if signal in ("ack", "nack"):
            with self._lock:
                self._in_hand.discard(_broker_id(args[0]))
        elif signal == "worker_boot":
            self._worker = args[0]

    # Commands: every one goes through the dispatch script.

    def _dispatch(self, command: str):
        run = super()._dispatch(command)

        def dispatch(queue_name, *args):
            try:
                return run(queue_name, *args)
            except redis.RedisError as exc:
                self._doubt()
                if command in _SETTLING and isinstance(exc, redis.TimeoutError):
                    raise redis.ConnectionError(f"{exc} (during {command})") from exc
                raise

        return dispatch

    def do_fetch(self, queue_name: str, prefetch: int) -> list:
        fetched = self._dispatch("fetch")(queue_name, prefetch)
        if queue_name in self._doubtful and self._worker is not None:
            self._put_back_lost(queue_name, fetched)
        return fetched

    def _doubt(self) -> None:
        """A command failed: what it did, or what the consumer threads drop on restart, is not
        known, so every queue's ack set is checked at its next successful fetch."""
        with self._lock:
            for queue in self.get_declared_queues():
                self._doubtful.update((queue, dq_name(queue)))

    def _put_back_lost(self, queue_name: str, fetched: list) -> None:
        """Put back on ``queue_name`` the messages in this worker's ack set that it does not hold.

        Runs in the queue's consumer thread, the only thread that fetches from it, so no fetch
        of that queue can add to the ack set meanwhile.
        """
        holding = self._holding(queue_name)
        if holding is None:
            return
        holding.update(_broker_id_of_payload(data) for data in fetched if data)
        acks = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        payloads = []
        try:
            lost = [i for i in (m.decode() for m in self.client.smembers(acks)) if i not in holding]
            if lost:
                payloads = self.client.hmget(f"{self.namespace}:{queue_name}.msgs", lost)
                self.do_requeue(queue_name, *lost)
        except redis.RedisError:
            return  # still doubtful: the next fetch tries again
        with self._lock:
            self._doubtful.discard(queue_name)
        for payload in payloads:
            logger.warning(
                "message %s was fetched from %s by this worker but never reached it (Redis"
                " stalled or the consumer restarted); put back on the queue",
                _message_id_of_payload(payload),
                queue_name,
            )

    def _holding(self, queue_name: str) -> set[str] | None:
        """Broker ids of the messages this worker holds from ``queue_name``; None when dramatiq's
        internals are not as expected."""
        try:
            # The work queue before the messages in hand: a message moves from one to the other.
            queued = [item.message for item in list(self._worker.work_queue.queue)]
            with self._lock:
                holding = set(self._in_hand)
            thread = self._worker.consumers.get(queue_name)
            if thread is not None:
                queued += [item.message for item in list(thread.delay_queue.queue)]
                consumer = getattr(thread, "consumer", None)
                cached = list(getattr(consumer, "message_cache", None) or [])
                holding.update(_broker_id_of_payload(data) for data in cached if data)
            holding.update(_broker_id(message) for message in queued)
            return holding
        except AttributeError as exc:
            if not self._warned_internals:
                self._warned_internals = True
                logger.warning("cannot tell which fetched messages this worker holds (%s)", exc)
            return None


def _broker_id(message) -> str:
    return message.options.get("redis_message_id", "")


def _broker_id_of_payload(data: bytes | str) -> str:
    try:
        return json.loads(data)["options"]["redis_message_id"]
    except (ValueError, TypeError, KeyError):
        return ""


def _message_id_of_payload(data: bytes | None) -> str:
    try:
        return str(json.loads(data)["message_id"])
    except (ValueError, TypeError, KeyError):
        return "(gone)"
