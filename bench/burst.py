"""Section 4: a burst of single-row writes against a real worker on the real Redis broker.

10,000 membership inserts, each its own transaction, spread round-robin over 50 capture sets:
the worst case for a write-path that sends messages, since every commit asks for a recompute.
An in-process ``dramatiq.Worker`` (two threads, the broker django-dramatiq configured from
settings) drains while the writes go on, exactly as ``rundramatiq`` would.

Figures per repeat:

- **messages**: ``recompute_pending`` and ``drain_backlog`` messages the broker accepted during
  the burst, counted by a middleware (a delayed message is enqueued twice under one id; it is
  one message);
- **last commit → exact**: seconds from the last write's commit until every one of the 50 sets
  has no mark pending and stored counts equal to counts computed independently in SQL.

After each repeat the bench waits until the queue is empty, then deletes the memberships
quietly and drains in-process, so every repeat starts from 50 empty sets and an idle worker.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import dramatiq
from django.conf import settings
from dramatiq.middleware import Middleware

from bench import dataset
from bench.timing import median, percentile, stopwatch
from counts.marks import quiet
from project.monitoring.models import SourceImageCollection

Through = SourceImageCollection.images.through
_booted = {"done": False}
ACTORS = ("recompute_pending", "drain_backlog")


class MessageCounter(Middleware):
    """Distinct message ids enqueued per actor (retries are counted apart)."""

    def __init__(self) -> None:
        self.ids: dict[str, set] = {}
        self.retries = 0

    def after_enqueue(self, broker, message, delay):
        if message.options.get("retries"):
            self.retries += 1
        self.ids.setdefault(message.actor_name, set()).add(message.message_id)

    def sent(self) -> dict[str, int]:
        return {actor: len(self.ids.get(actor, ())) for actor in ACTORS}

    def clear(self) -> None:
        self.ids.clear()
        self.retries = 0


def broker():
    """The configured broker, booted once per process as ``rundramatiq`` would boot it."""
    import workers.actors  # noqa: F401  (declares the actors and their queue on the broker)

    b = dramatiq.get_broker()
    if not _booted["done"]:
        b.emit_after("process_boot")
        _booted["done"] = True
    return b


def queued_messages() -> int:
    """Messages enqueued, delayed or running on the counts queue."""
    from workers.actors import QUEUE

    b = broker()
    return sum(b.client.hlen(f"{b.namespace}:{q}.msgs") for q in (QUEUE, f"{QUEUE}.DQ"))


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` holds, or None after ``timeout``."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            return None
        time.sleep(interval)
    return time.perf_counter() - started


@contextmanager
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


def setup(n_sets: int, writes: int) -> tuple[list[int], list[int]]:
    """Empty sets and the captures the burst will put in them."""
    project = dataset.new_project("burst")
    sets = dataset.new_sets(project, [f"burst set {i:02d}" for i in range(n_sets)])
    images = dataset.sample_images(math.ceil(writes / n_sets), salt=4)
    return sets, images


def _empty(sets: list[int]) -> None:
    with quiet():
        Through.objects.filter(sourceimagecollection_id__in=sets).delete()
    dataset.drain_all()
    dataset.vacuum(dataset.THROUGH, "monitoring_sourceimagecollection", "counts_dirtymark")


def measure(sets: list[int], images: list[int], writes: int, repeats: int, log) -> dict:
    with quiet_logs():
        return _measure(sets, images, writes, repeats, log)


def _measure(sets: list[int], images: list[int], writes: int, repeats: int, log) -> dict:
    b = broker()
    counter = MessageCounter()
    b.add_middleware(counter)
    worker = dramatiq.Worker(b, worker_threads=2, worker_timeout=100)
    worker.start()
    runs = []
    try:
        for rep in range(repeats):
            wait_until(lambda: queued_messages() == 0, timeout=120)
            counter.clear()
            with stopwatch() as sw:
                for i in range(writes):
                    Through.objects.create(
                        sourceimagecollection_id=sets[i % len(sets)],
                        sourceimage_id=images[(i // len(sets)) % len(images)],
                    )
            exact_after = wait_until(lambda: dataset.sets_exact(sets), timeout=120)
            wait_until(lambda: queued_messages() == 0, timeout=120)
            sent = counter.sent()
            runs.append(
                {
                    "write_seconds": round(sw.seconds, 3),
                    "messages": sum(sent.values()),
                    "by_actor": sent,
                    "retries": counter.retries,
                    "exact_after_s": None if exact_after is None else round(exact_after, 3),
                }
            )
            log(
                f"burst {rep + 1}/{repeats}: {writes:,} writes in {sw.seconds:.1f} s,"
                f" {sum(sent.values())} messages, exact "
                + ("NEVER (timeout)" if exact_after is None else f"{exact_after:.2f} s")
                + " after the last commit"
            )
            _empty(sets)
    finally:
        worker.stop()
        b.middleware.remove(counter)
    reached = [r["exact_after_s"] for r in runs if r["exact_after_s"] is not None]
    return {
        "writes": writes,
        "sets": len(sets),
        "repeats": repeats,
        "worker_threads": 2,
        "debounce_ms": settings.COUNTS_DEBOUNCE_MS,
        "exact": len(reached) == len(runs),
        "messages_median": median([r["messages"] for r in runs]),
        "messages_max": max(r["messages"] for r in runs),
        "writes_per_s": round(writes / median([r["write_seconds"] for r in runs]), 1),
        "exact_after_p50_s": round(percentile(reached, 50), 3) if reached else None,
        "exact_after_p99_s": round(percentile(reached, 99), 3) if reached else None,
        "runs": runs,
    }
