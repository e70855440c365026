"""Section: does a backlog on hot targets drain as fast with more drainers?

The README promises that more workers drain faster. On hot targets they used not to: a backlog
of single-row writes on the largest capture set all credits the same few rows (the set, its
stations and nights), and each extra drainer found them held by another and put their credits
back, due a second later (issue 27, case 5).

Per repeat, with no worker running: 5,000 detections are created on captures of the largest
set, each its own transaction (5,000 item marks). Then 1, 2 or 4 drainers (threads, each with
its own connection, each running the workers' own drain loop ``workers.actors.drain_label``
for every label that has marks, until no mark is left) drain them. The figure is the time from
the drainers' start until the mark table is empty, and the counts of the set, its stations and
nights are compared with an independent count. The variants are alternated within each repeat
(1, 2, 4, then 4, 2, 1, ...) so that the machine's noise falls on all of them alike; medians
and the ratio to one drainer are reported. The detections are deleted quietly (and drained)
after each variant.
"""

from __future__ import annotations

import threading
import time

from django.db import connection, connections

from bench import dataset
from bench.inprocess import drop_queued, quiet_logs
from bench.timing import median
from counts.run.marks import has_pending, pending_summary
from counts.run.notice import quiet
from project.monitoring.models import Detection, SourceImage
from workers.actors import QUEUE, drain_label

VARIANTS = (1, 2, 4)


def _images_of(set_id: int, n: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sourceimage_id FROM monitoring_sourceimagecollection_images"
            " WHERE sourceimagecollection_id = %s ORDER BY hashint8extended(sourceimage_id, 5)"
            " LIMIT %s",
            [set_id, n],
        )
        return [row[0] for row in cursor.fetchall()]


def _write_backlog(images: list[int], writes: int) -> list[int]:
    """``writes`` single-row transactions, each a detection on one of ``images``; no message
    is sent (no worker is to see them before the drainers start)."""
    made = []
    with quiet():
        for i in range(writes):
            image = SourceImage(pk=images[i % len(images)])
            made.append(Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4]).pk)
    return made


def _drainer(errors: list) -> None:
    try:
        while has_pending():
            due = [p.label for p in pending_summary() if p.due]
            for label in due:
                drain_label(label, fan_out=False)
            if not due:
                time.sleep(0.01)  # only marks put back for later: wait for them to come due
    except Exception as exc:  # reported by the caller
        errors.append(exc)
    finally:
        connections.close_all()


def _drain_with(n: int) -> float:
    errors: list = []
    threads = [threading.Thread(target=_drainer, args=(errors,)) for _ in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def _tidy(made: list[int]) -> None:
    # The drain loop asks Redis for a later drain of work it put back; no worker runs here, so
    # those messages would wait in the queue for the next section's worker: drop them.
    drop_queued(QUEUE)
    with quiet():
        Detection.objects.filter(pk__in=made).delete()
    dataset.drain_all()
    dataset.vacuum("monitoring_detection", "counts_dirtymark", "counts_ledger")


def measure(set_id: int, writes: int, repeats: int, log) -> dict:
    with quiet_logs():
        return _measure(set_id, writes, repeats, log)


def _measure(set_id: int, writes: int, repeats: int, log) -> dict:
    images = _images_of(set_id, writes)
    seconds: dict[int, list[float]] = {n: [] for n in VARIANTS}
    exact = True
    for rep in range(repeats):
        order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
        for n in order:
            made = _write_backlog(images, writes)
            took = _drain_with(n)
            seconds[n].append(took)
            exact = exact and dataset.sets_exact([set_id])
            log(
                f"drainers {rep + 1}/{repeats}: {writes:,} writes on the largest set, {n} drainers:"
                f" empty in {took:.2f} s"
            )
            _tidy(made)
    one = median(seconds[1])
    return {
        "writes": writes,
        "repeats": repeats,
        "exact": exact,
        "median_s": {str(n): round(median(v), 3) for n, v in seconds.items()},
        "ratio_to_one": {str(n): round(median(v) / one, 2) for n, v in seconds.items()},
        "runs_s": {str(n): [round(x, 3) for x in v] for n, v in seconds.items()},
    }
