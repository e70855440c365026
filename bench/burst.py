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

import math

from django.conf import settings

from bench import dataset
from bench.inprocess import (
    counting_messages,
    queued_messages,
    quiet_logs,
    running_worker,
    wait_until,
)
from bench.timing import median, percentile, stopwatch
from counts.run.notice import quiet
from project.monitoring.models import SourceImageCollection

Through = SourceImageCollection.images.through
ACTORS = ("recompute_pending", "drain_backlog")


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
    runs = []
    with counting_messages() as counter, running_worker(threads=2):
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
            sent = {actor: counter.sent[actor] for actor in ACTORS}
            runs.append(
                {
                    "write_seconds": round(sw.seconds, 3),
                    "messages": sum(sent.values()),
                    "by_actor": sent,
                    "retries": sum(counter.retries.values()),
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
