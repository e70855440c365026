"""Section 2, last figure: one row per transaction, through the whole write path.

What a web request that saves one detection pays for exact counts: the count triggers inside
its transaction, the commit, and the after-commit notice to Redis (``counts.run.notice`` and
``workers.hooks``: a debounced message request per model or item kind written, skipped while
a message or a drainer is known to be coming, ``workers.debounce``). Unlike the other write
figures, each sample here commits, ``transactions`` times in a row, with a real worker (two
threads, the configured Redis broker) taking the messages as ``rundramatiq`` would: a message
nobody takes would hold its debounce key for the margin (30 s) and make every later writer ask
Redis again, a world no deployment runs in.

- **on**: ``Detection.objects.create`` in autocommit, triggers and notice as in production;
- **off**: the same with the detection table's count triggers disabled (``ALTER TABLE …
  DISABLE TRIGGER`` by name, committed, so this must run on a bench database nobody else
  writes to) and the notice silenced (``counts.run.notice.quiet``): a world without cached counts.

Samples alternate on/off and off/on (ABBA) after an untimed pair; each starts once the worker
is idle (no message queued, delayed or running), so no sample shares the CPU with a drain. The
rows written are deleted afterwards the way they were written (triggers on or off), and the
marks left are drained, so the dataset ends as it began. The goal the issue set: at most 1.3x.
"""

from __future__ import annotations

from django.db import connection

from bench.inprocess import queued_messages, quiet_logs, running_worker, wait_until
from bench.timing import median, ms, ratio, stopwatch
from bench.writes import count_triggers
from counts.api import drain_until_empty
from counts.run.notice import quiet
from project.monitoring.models import Detection

TABLE = "monitoring_detection"
SENTINEL = -1.0  # the bench's detections (bench.dataset.BENCH_SCORE)


def _toggle(enable: bool) -> None:
    verb = "ENABLE" if enable else "DISABLE"
    with connection.cursor() as cursor:
        for name in count_triggers(TABLE):
            cursor.execute(f'ALTER TABLE "{TABLE}" {verb} TRIGGER {name}')


def _sample(images: list[int], on: bool) -> float:
    wait_until(lambda: queued_messages() == 0, timeout=120)
    if not on:
        _toggle(False)
    try:
        with stopwatch() as sw:
            if on:
                for image in images:
                    Detection.objects.create(
                        source_image_id=image, bbox=[1, 2, 3, 4], score=SENTINEL
                    )
            else:
                with quiet():
                    for image in images:
                        Detection.objects.create(
                            source_image_id=image, bbox=[1, 2, 3, 4], score=SENTINEL
                        )
        return sw.seconds
    finally:
        # Rows written with the triggers off are deleted with them off too: they were never
        # counted, so their deletion must not be either.
        with quiet():
            Detection.objects.filter(score=SENTINEL).delete()
        if not on:
            _toggle(True)
        drain_until_empty()


def measure(images: list[int], repeats: int, log) -> dict:
    """Median ms of ``len(images)`` single-row transactions, on and off."""
    with quiet_logs(), running_worker(threads=2):
        return _measure(images, repeats, log)


def _measure(images: list[int], repeats: int, log) -> dict:
    samples: dict[str, list[float]] = {"on": [], "off": []}
    _sample(images, True), _sample(images, False)  # warm-up pair
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for on in order:
            samples["on" if on else "off"].append(_sample(images, on))
    on_ms, off_ms = median(samples["on"]), median(samples["off"])
    result = {
        "label": f"{len(images):,} single-row transactions, commit and notice, worker running",
        "on_ms": ms(on_ms),
        "off_ms": ms(off_ms),
        "ratio": ratio(on_ms, off_ms),
        "samples_ms": {k: [ms(v) for v in vs] for k, vs in samples.items()},
    }
    log(
        f"write {result['label']}: on {result['on_ms']:.1f} ms, off {result['off_ms']:.1f} ms,"
        f" x{result['ratio']:.3f}"
    )
    return result
