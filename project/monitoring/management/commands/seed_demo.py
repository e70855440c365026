"""``manage.py seed_demo [--scale N] [--seed S] [--if-empty]``: realistic demo data, fast.

``bin/run`` calls it with ``--if-empty`` on every start, so a fresh checkout opens on stations,
nights, captures and capture sets with believable counts. ``--scale 1000000`` builds the data set
the engine is benchmarked on (half-a-million-image sets included) in a few minutes.

Two phases:

1. **Load** (:func:`project.monitoring.demo.load`) in one transaction, so a failed seed leaves
   nothing behind for ``--if-empty`` to mistake for a finished one. The count triggers fire as
   for any writer and leave a few hundred marks.
2. **Count**: ``counts.rebuild()`` brings every item's ledger and every target row to the
   truth in short range-chunked transactions, then deletes the marks it covered; the amounts
   the load queued (own-row deltas) are then drained, so nothing is left pending. Nothing else
   runs meanwhile, so the rebuild runs on :data:`JOBS` connections side by side (``--jobs``).
"""

import sys
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from tqdm import tqdm

import counts
from counts.api import drain_until_empty
from counts.run.notice import quiet
from project.monitoring.demo import load, make_plan
from project.monitoring.models import Project

#: Tables whose statistics the recompute plans depend on right after the load.
#: Connections the count phase runs on (``counts.rebuild(jobs=...)``): two cores' worth, what
#: our smallest machines have.
JOBS = 2
LOADED_TABLES = (
    "monitoring_deployment",
    "monitoring_event",
    "monitoring_sourceimage",
    "monitoring_detection",
    "monitoring_occurrence",
    "monitoring_sourceimagecollection",
    "monitoring_sourceimagecollection_images",
)


class Command(BaseCommand):
    help = "Load deterministic demo data in bulk and bring every cached count up to date."

    def add_arguments(self, parser):
        parser.add_argument(
            "--scale", type=int, default=20_000, help="Number of captures (default 20000)"
        )
        parser.add_argument("--seed", type=int, default=1, help="Same seed, same data")
        parser.add_argument(
            "--if-empty", action="store_true", help="Do nothing when any project exists"
        )
        parser.add_argument(
            "--chunk", type=int, default=5000, help="Most rows per transaction of the count"
        )
        parser.add_argument(
            "--jobs",
            type=int,
            default=JOBS,
            help=f"Connections the count runs on side by side (default {JOBS}; nothing else is"
            " running while a data set is seeded)",
        )

    def handle(self, *args, scale, seed, if_empty, chunk, jobs, **options):
        if scale < 100:
            raise CommandError("--scale must be at least 100 captures")
        if jobs < 1:
            raise CommandError("--jobs must be at least 1")
        if if_empty and Project.objects.exists():
            self.stdout.write("seed_demo: projects exist already; nothing to do")
            return
        started = time.perf_counter()
        plan = make_plan(scale, seed)
        with (
            tqdm(total=scale, unit="capture", desc="loading", file=sys.stderr, disable=None) as bar,
            transaction.atomic(),
            quiet(),
        ):
            rows = load(plan, bar.update)
        loaded = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {', '.join(LOADED_TABLES)}")
        report = self.bring_counts_up_to_date(chunk, jobs)
        finished = time.perf_counter()
        self.stdout.write(
            f"seed_demo: {rows['project']} projects, {rows['deployment']} stations,"
            f" {rows['event']} nights, {rows['capture']} captures,"
            f" {rows['detection']} detections, {rows['occurrence']} occurrences,"
            f" {rows['taxon']} new taxa, {rows['set']} capture sets"
            f" ({rows['membership']} memberships); {report.checked} counted rows, drift fixed"
            f" in {report.drifted_rows}; {finished - started:.1f}s"
            f" (load {loaded - started:.1f}s, counts {finished - loaded:.1f}s)"
        )

    def bring_counts_up_to_date(self, chunk: int, jobs: int):
        """Recompute every target (``counts.rebuild``), which also drops the marks it covered."""
        total = sum(counts.target_rows().values())
        seen: dict[str, int] = {}
        with tqdm(total=total, unit="row", desc="counting", file=sys.stderr, disable=None) as bar:

            def progress(label: str, checked: int) -> None:
                bar.update(checked - seen.get(label, 0))
                seen[label] = checked

            report = counts.rebuild(chunk=chunk, progress=progress, jobs=jobs)
        # Amounts the load queued for the rows (own-row deltas) are left by the rebuild for
        # the drains: its recount counted them as on their way. Add them now, so the data
        # set opens with nothing pending.
        drain_until_empty(max_ids=50_000)
        return report
