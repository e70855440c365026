"""Running and observing the counts workers inside one process: for the bench and the tests.

Real pieces only: the broker django-dramatiq configured from settings (Redis), a real
``dramatiq.Worker``, and a middleware that watches what the broker accepts. Nothing here is
used on the production path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter

import dramatiq
from dramatiq.middleware import Middleware

from workers import debounce
from workers.queued import label_of_message, queue_sizes
from workers.redis_client import client

_booted = {"done": False}


def booted_broker():
    """The configured broker, booted once per process as ``rundramatiq`` would boot it."""
    import workers.actors  # noqa: F401  (declares the actors and their queue on the broker)

    broker = dramatiq.get_broker()
    if not _booted["done"]:
        broker.emit_after("process_boot")
        _booted["done"] = True
    return broker


class MessageCounter(Middleware):
    """Messages sent per actor, as the broker accepted them.

    A delayed message is enqueued twice (into the delay queue, then into the queue when due)
    under one message id: it is one message. Retries are counted apart, in ``retries``.
    """

    def __init__(self) -> None:
        self.ids: dict[str, set] = {}
        #: Drain messages' ids per target model (``workers.queued.label_of_message``).
        self.label_ids: dict[str, set] = {}
        self.retries: Counter = Counter()

    def after_enqueue(self, broker, message, delay):
        if message.options.get("retries"):
            self.retries[message.actor_name] += 1
        self.ids.setdefault(message.actor_name, set()).add(message.message_id)
        label = label_of_message(message.encode())
        if label:
            self.label_ids.setdefault(label, set()).add(message.message_id)

    @property
    def sent(self) -> Counter:
        return Counter({actor: len(ids) for actor, ids in self.ids.items()})

    @property
    def by_label(self) -> Counter:
        """Drain messages sent per target model."""
        return Counter({label: len(ids) for label, ids in self.label_ids.items()})

    def clear(self) -> None:
        self.ids.clear()
        self.label_ids.clear()
        self.retries.clear()


@contextlib.contextmanager
def counting_messages():
    """A :class:`MessageCounter` attached to the broker for the block's duration."""
    counter, broker = MessageCounter(), booted_broker()
    broker.add_middleware(counter)
    try:
        yield counter
    finally:
        broker.middleware.remove(counter)


@contextlib.contextmanager
def running_worker(threads: int = 2):
    """A real worker consuming the configured broker's queues until the block ends."""
    worker = dramatiq.Worker(booted_broker(), worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def queued_messages() -> int:
    """Messages enqueued, delayed or running on the counts queue."""
    booted_broker()
    sizes = queue_sizes()
    return sizes["pending"] + sizes["delayed"]


def drop_queued(queue: str) -> None:
    """Drop ``queue``'s messages, and the debounce keys that stood for them.

    A drain loop run without a worker (the bench's drainers) asks Redis for a later drain of
    the work it put back or left at its deadline: a message, and a debounce key telling writers
    one is on its way, for ``COUNTS_DEBOUNCE_MARGIN_MS`` (30 s). Dropping the message alone
    left the key: writers within those 30 s (a later section's, the next run's) sent nothing,
    and no worker heard of their marks; the burst section waited out its two minutes and found
    its sets not exact."""
    booted_broker().flush(queue)
    redis = client()
    keys = list(redis.scan_iter(match=debounce.debounce_key("*"), count=1000))
    if keys:
        redis.delete(*keys)


def dead_letters() -> int:
    """Messages of the counts queue in the dead-letter set."""
    booted_broker()
    return queue_sizes()["dead"]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` holds, or None after ``timeout``."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            return None
        time.sleep(interval)
    return time.perf_counter() - started


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """Keep the worker's per-batch INFO lines out of the bench's output; errors still show."""
    loggers = [logging.getLogger(name) for name in ("dramatiq", "workers")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, previous, strict=True):
            lg.setLevel(lvl)
