"""Section: adding a count to a live database — the engine's backfill against a hand-written one,
and what either costs the writers meanwhile.

A migration that adds a count runs ``counts.operate.backfill.backfill(label, [name])`` on a
database in use. The section simulates adding one count of the capture item kind (by default
``SourceImage.detections_count``; ``--backfill-count label.column`` for another) in the bench's
scratch copy of the database (``bench.scratch``): before each sample the count's state is
cleared as if it had just been declared — its column set to 0 for every row (with the engine's
setting, ``SET LOCAL counts.engine = 'on'``, which the column guards let through and the count
triggers ignore) and its key removed from every capture's ledger (``state - '<key>'``, empty
ledgers deleted) — then ``VACUUM (ANALYZE)`` (untimed). Then, in an order rotated per repeat:

- **engine**: ``counts.operate.backfill.backfill(label, [column])`` — a lease, then the capture kind
  swept for that key only, 5,000 captures per transaction, each chunk claiming its ledger rows,
  writing the entries and crediting the targets;
- **baseline, chunked** (``bench.baseline``): per 5,000 captures one transaction and one
  statement that builds the key's entries, merges them into the ledgers (``INSERT … ON
  CONFLICT DO UPDATE SET state = state || …``) and adds their amounts to the column;
- **idle**: no backfill, only the writer below, for ``--backfill-idle`` seconds;
- **engine, drained**, **baseline, drained** and **idle, drained**: the same three with a
  **drainer** beside them
  (``_drain``, a process running the workers' own drain loop ``workers.actors.drain_label``
  over every label with due marks), as in production, where
  the workers keep draining while a deploy's migration backfills. They show that drains go on
  during the pass (the batches drained, and the oldest waiting mark's age, which a
  **watcher** process samples every 50 ms) and what the pass costs the writer then, against
  the drained idle sample; the hand-written pass's figure beside it tells what any pass of
  that speed costs the writer on this machine (on two cores, the pass, the drainer and the
  writer, each with its server process, contend for the CPU). The hand-written pass takes
  no lock, so a drain writing the same ledgers meanwhile can leave its result wrong: the
  section records whether it did, then fills the count again with nothing beside it.

All the while a **writer** (``_write``, in a process of its own: :class:`Forked`) commits
single-row ORM writes the triggers mark: a detection created on a random capture, then
deleted, each its own transaction, one after the other. Its commit latencies while a
backfill runs are compared with those of the idle sample: the p99 of each, and their ratio.
After each sample the writer's marks are drained and the count's column and the captures'
ledgers must equal the truth (``bench.baseline``'s statements; no mark left).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
import traceback

from django.conf import settings
from django.db import connection, connections, transaction

from bench import baseline, dataset
from bench.inprocess import booted_broker, drop_queued
from bench.phases import Phases
from bench.timing import median, ms, percentile, ratio, stopwatch
from counts.base.names import ENGINE_SETTING, LEDGER_TABLE
from counts.operate.backfill import backfill
from counts.run.marks import has_pending, pending_summary
from counts.run.notice import quiet
from project.monitoring.models import Detection
from workers import debounce
from workers.actors import QUEUE, drain_label

VARIANTS = ("idle", "engine", "baseline", "idle_drained", "engine_drained", "baseline_drained")
DEFAULT_COUNT = "monitoring.sourceimage.detections_count"
#: The counts this section can clear and backfill: the capture kind's (``bench.baseline``
#: builds their entries), i.e. every count of detections but the occurrence ones.
SUPPORTED = (
    "monitoring.sourceimage.detections_count",
    "monitoring.deployment.detections_count",
    "monitoring.event.detections_count",
    "monitoring.sourceimagecollection.source_images_with_detections_count",
    "monitoring.sourceimagecollection.source_images_processed_count",
)
#: The writer runs this long before a sample starts (its connection made, its first plans).
WARMUP_S = 0.2


class Count:
    """The count being added: its table, column and ledger key."""

    def __init__(self, name: str) -> None:
        label, _, column = name.rpartition(".")
        self.name, self.label, self.column = name, label, column
        self.table = next(t for t in baseline.TABLES if t.label == label)
        self.key = baseline.key(label, column)

    def clear(self) -> None:
        """The count as if just declared: column 0 everywhere, no ledger entry."""
        kind = baseline.CAPTURE_KIND
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT set_config(%s, 'on', true)", [ENGINE_SETTING])
            cursor.execute(
                f"UPDATE {self.table.table} SET {self.column} = 0 WHERE {self.column} <> 0"
            )
            cursor.execute(
                f"UPDATE {LEDGER_TABLE} SET state = state - %s WHERE kind = %s AND state ? %s",
                [self.key, kind, self.key],
            )
            cursor.execute(f"DELETE FROM {LEDGER_TABLE} WHERE kind = %s AND state = '{{}}'", [kind])
        dataset.vacuum(LEDGER_TABLE, self.table.table, "counts_dirtymark", "monitoring_detection")

    def baseline_chunk(self, lo, hi) -> str:
        """One chunk of the hand-written backfill: the key's entries for the captures in
        ``(lo, hi]`` merged into their ledgers, their amounts added to the column."""
        k, kind = baseline._lit(self.key), baseline._lit(baseline.CAPTURE_KIND)
        states = baseline._capture_states(lo, hi, keys=(self.key,))
        col, table = self.column, self.table.table
        return (
            f"WITH t AS MATERIALIZED ({states}),"
            f" w AS (INSERT INTO {LEDGER_TABLE} AS l (kind, item_id, state)"
            f"  SELECT {kind}, item_id, state FROM t ON CONFLICT (kind, item_id)"
            "  DO UPDATE SET state = l.state || EXCLUDED.state RETURNING 1),"
            f" c AS (SELECT x::bigint AS id, sum((t.state->{k}->>0)::int) AS n FROM t"
            f"  CROSS JOIN LATERAL jsonb_array_elements_text((t.state->{k}) - 0) x GROUP BY 1),"
            f" u AS (UPDATE {table} s SET {col} = s.{col} + c.n,"
            "  counts_updated_at = statement_timestamp() FROM c WHERE s.id = c.id RETURNING 1)"
            " SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM u)"
        )

    def exact(self) -> bool:
        """The column and every capture's ledger equal the truth; no mark pending."""
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL jit = off")
            cursor.execute(baseline.check_table(self.table))
            _rows, wrong_rows = cursor.fetchone()
            cursor.execute(baseline.check_ledger(baseline.KINDS[1]))
            _items, wrong_items = cursor.fetchone()
        return wrong_rows == 0 and wrong_items == 0 and not has_pending()


def engine(count: Count) -> dict:
    phases = Phases()
    with stopwatch() as sw, phases.watching():
        backfill(count.label, [count.column], progress=phases.progress)
    return {"seconds": sw.seconds, "breakdown": phases.summary()}


def hand_written(count: Count) -> dict:
    ledgers = rows = chunks = 0
    with stopwatch() as sw:
        for lo, hi in baseline._bounds("monitoring_sourceimage", "id", baseline.ITEM_CHUNK):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config(%s, 'on', true), set_config('jit', 'off', true)",
                    [ENGINE_SETTING],
                )
                cursor.execute(count.baseline_chunk(lo, hi))
                written, credited = cursor.fetchone()
            ledgers, rows, chunks = ledgers + written, rows + credited, chunks + 1
    return {"seconds": sw.seconds, "ledgers_written": ledgers, "rows_written": rows,
            "transactions": chunks}  # fmt: skip


class Forked:
    """A loop in a process of its own until stopped: ``samples`` holds what it recorded,
    ``(monotonic time, value)`` pairs, once stopped.

    A process, as the application's writers and workers are, not a thread of the bench: a
    thread shared the GIL with the pass it was measuring, so every statement the pass made
    waited for the thread's Python to let go (up to a switch interval, 5 ms) and the thread
    for the pass's, and both figures measured that instead of the database. Forked, so that it
    runs against the database the section set up; the bench's connections are closed first so
    the processes share none.
    """

    def __init__(self, loop, *args) -> None:
        context = multiprocessing.get_context("fork")
        self.stopping = context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_run, args=(loop, args, self.stopping, sender), daemon=True
        )
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        connections.close_all()
        self.process.start()

    def stop(self) -> None:
        """Stop the loop and collect its samples; raises what it failed with."""
        self.stopping.set()
        self.samples, error = self._results.recv()
        self.process.join()
        if error is not None:
            raise RuntimeError(f"the backfill section's {self.process.name} failed:\n{error}")

    def between(self, start: float, end: float) -> list[float]:
        return [value for at, value in self.samples if start <= at <= end]


def _run(loop, args, stopping, sender) -> None:
    samples, error = [], None
    try:
        loop(*args, stopping, samples)
    except BaseException:  # reported by the bench process
        error = traceback.format_exc()
    finally:
        connections.close_all()
        sender.send((samples, error))


def _write(images: list[int], seed: int, stopping, samples: list) -> None:
    """The **writer**: single-row ORM writes the triggers mark, each committed alone (a
    detection created on a random capture, then deleted); samples its commit latencies, timed
    by ``time.monotonic``, the clock the bench process reads too."""
    rng = random.Random(seed)
    with quiet():  # no worker runs: marks are drained by the section or its drainer
        while not stopping.is_set():
            image = rng.choice(images)
            started = time.monotonic()
            made = Detection.objects.create(
                source_image_id=image, bbox=[1, 2, 3, 4], score=dataset.BENCH_SCORE
            )
            middle = time.monotonic()
            Detection.objects.filter(pk=made.pk).delete()
            ended = time.monotonic()
            samples += [(started, middle - started), (middle, ended - middle)]


#: The drainer's time budget per call of the drain loop (``COUNTS_DRAIN_BUDGET_S`` in its
#: process): a loop fed by a writer that never stops would run out the workers' whole budget
#: before it reports its batches; a short one makes them land inside the sample.
DRAIN_BUDGET_S = 0.25


def _drain(stopping, samples: list) -> None:
    """The **drainer**: the workers' drain loop over every label with due marks; samples the
    batches each call drained."""
    settings.COUNTS_DRAIN_BUDGET_S = DRAIN_BUDGET_S
    # A line per batch, thousands a sample, would bury the section's own lines.
    logging.getLogger("workers.drain").setLevel(logging.WARNING)
    booted_broker()
    drained: set[str] = set()
    while not stopping.is_set():
        due = [p.label for p in pending_summary() if p.due]
        drained.update(due)
        samples.append((time.monotonic(), sum(drain_label(x, fan_out=False) for x in due)))
        if not due:
            time.sleep(0.01)
    # A drain loop that ran out its budget returns with its draining flag up (its message's
    # successor would take over): left up, writers would send nothing for the flag's lifetime,
    # and the next section's (or test's) worker would never hear of their marks.
    for label in drained:
        debounce.drop_draining(label)


#: How often the watcher looks at the mark queue.
WATCH_S = 0.05


def _watch(stopping, samples: list) -> None:
    """The **watcher**: the age of the oldest waiting item or delta mark (a backfill's own
    every-row lease left out), every :data:`WATCH_S`: how far the drains lag."""
    while not stopping.wait(WATCH_S):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)"
                " FROM counts_dirtymark WHERE ids IS NOT NULL"
            )
            samples.append((time.monotonic(), float(cursor.fetchone()[0])))


#: Longest the section waits for marks put back for later to come due and be drained.
SETTLE_S = 30.0


def _drain_to_empty() -> None:
    """Drain every mark, including those a drain put back for later (a row or item the drainer,
    the pass or the writer held: due a moment later), so that exactness is judged on a queue
    that is really empty. ``dataset.drain_all`` leaves those until they are due."""
    deadline = time.monotonic() + SETTLE_S
    dataset.drain_all()
    while has_pending():
        if time.monotonic() > deadline:
            raise RuntimeError(f"marks still pending {SETTLE_S:.0f} s after the sample")
        time.sleep(0.05)
        dataset.drain_all()


def _exactness(found: dict) -> str:
    """What a sample's log line says of its result, when there is something to say."""
    if not found["exact"]:
        return "  (NOT EXACT)"
    if found.get("exact_while_drained") is False:
        return "  (left wrong beside the drainer: it takes no lock; filled again alone, exact)"
    return ""


def _refill(count: Count) -> bool:
    """The count cleared and filled by the hand-written pass with nothing beside it; exact?"""
    count.clear()
    hand_written(count)
    _drain_to_empty()
    return count.exact()


def _sample(variant: str, count: Count, images: list[int], idle_s: float, seed: int) -> dict:
    if not variant.startswith("idle"):
        count.clear()
    writer = Forked(_write, images, seed)
    drained = variant.endswith("_drained")
    drainer, watcher = (Forked(_drain), Forked(_watch)) if drained else (None, None)
    for process in filter(None, (writer, drainer, watcher)):
        process.start()
    time.sleep(WARMUP_S)
    start = time.monotonic()
    if variant.startswith("engine"):
        found = engine(count)
    elif variant.startswith("baseline"):
        found = hand_written(count)
    else:
        time.sleep(idle_s)
        found = {"seconds": idle_s}
    end = time.monotonic()
    writer.stop()
    if drained:
        drainer.stop()
        watcher.stop()
        found["batches_drained"] = int(sum(drainer.between(start, end)))
        ages = watcher.between(start, end)
        found["oldest_mark_max_s"] = round(max(ages, default=float("nan")), 3)
        # The drain loop asks Redis for a later drain of work it put back; no worker runs
        # here, so those messages would wait in the queue for the next section's worker.
        drop_queued(QUEUE)
    latencies = writer.between(start, end)
    _drain_to_empty()
    dataset.vacuum(LEDGER_TABLE, "monitoring_detection", "counts_dirtymark")
    found["seconds"] = round(found["seconds"], 3)
    found["exact"] = count.exact()
    if variant == "baseline_drained":
        # The hand-written pass takes no lock, so a drain writing the same ledgers meanwhile
        # can leave them wrong: recorded, then the count filled again, alone, so that the
        # next sample starts from the truth.
        found["exact_while_drained"], found["exact"] = found["exact"], _refill(count)
    found["writes"] = len(latencies)
    found["p50_ms"] = ms(percentile(latencies, 50))
    found["p99_ms"] = ms(percentile(latencies, 99))
    found["max_ms"] = ms(max(latencies, default=float("nan")))
    return found


def measure(name: str, repeats: int, idle_s: float, log) -> dict:
    count = Count(name)
    images = dataset.sample_images(10_000, salt=11)
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(repeats):
        shift = rep % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            found = _sample(variant, count, images, idle_s, seed=rep * 10 + shift)
            samples[variant].append(found)
            drain_note = (
                f"; {found['batches_drained']:,} batches drained, oldest mark at most"
                f" {found['oldest_mark_max_s']:.1f} s old"
                if "batches_drained" in found
                else ""
            )
            log(
                f"backfill {name} {variant}: {found['seconds']:.1f} s; writer p99"
                f" {found['p99_ms']:.1f} ms over {found['writes']:,} commits{drain_note}"
                + _exactness(found)
            )
    out: dict = {"count": name, "repeats": repeats, "idle_s": idle_s}
    for variant, runs in samples.items():
        out[variant] = {
            "seconds": round(median([r["seconds"] for r in runs]), 3),
            "p50_ms": round(median([r["p50_ms"] for r in runs]), 3),
            "p99_ms": round(median([r["p99_ms"] for r in runs]), 3),
            "writes": sum(r["writes"] for r in runs),
            "samples": runs,
        }
        if variant.endswith("_drained"):
            out[variant]["batches_drained"] = sum(r["batches_drained"] for r in runs)
            out[variant]["oldest_mark_max_s"] = max(r["oldest_mark_max_s"] for r in runs)
    out["exact"] = all(r["exact"] for runs in samples.values() for r in runs)
    raced = samples["baseline_drained"]
    out["baseline_drained"]["exact_while_drained"] = sum(r["exact_while_drained"] for r in raced)
    out["ratio"] = round(ratio(out["engine"]["seconds"], out["baseline"]["seconds"]), 2)
    out["p99_ratio"] = round(ratio(out["engine"]["p99_ms"], out["idle"]["p99_ms"]), 2)
    out["p99_ratio_baseline"] = round(ratio(out["baseline"]["p99_ms"], out["idle"]["p99_ms"]), 2)
    out["p99_ratio_drained"] = round(
        ratio(out["engine_drained"]["p99_ms"], out["idle_drained"]["p99_ms"]), 2
    )
    out["p99_ratio_baseline_drained"] = round(
        ratio(out["baseline_drained"]["p99_ms"], out["idle_drained"]["p99_ms"]), 2
    )
    log(
        f"backfill {name}: engine {out['engine']['seconds']:.1f} s vs baseline"
        f" {out['baseline']['seconds']:.1f} s ({out['ratio']:.2f}x); writer p99"
        f" {out['engine']['p99_ms']:.1f} ms during the engine's, {out['idle']['p99_ms']:.1f} ms"
        f" idle ({out['p99_ratio']:.2f}x), {out['baseline']['p99_ms']:.1f} ms during the"
        " baseline's" + ("" if out["exact"] else "  (NOT EXACT)")
    )
    drained, hand, idle = out["engine_drained"], out["baseline_drained"], out["idle_drained"]
    log(
        f"backfill {name} with a drainer: engine {drained['seconds']:.1f} s; writer p99"
        f" {drained['p99_ms']:.1f} ms vs {idle['p99_ms']:.1f} ms drained idle"
        f" ({out['p99_ratio_drained']:.2f}x), {hand['p99_ms']:.1f} ms during the baseline's"
        f" ({out['p99_ratio_baseline_drained']:.2f}x); {drained['batches_drained']:,} batches"
        f" drained during the passes, oldest mark at most {drained['oldest_mark_max_s']:.1f} s old"
        f" ({idle['oldest_mark_max_s']:.1f} s idle); the hand-written pass, which takes no"
        f" lock, left the count exact in {hand['exact_while_drained']} of {len(raced)} samples"
        " with a drainer beside it"
    )
    return out
