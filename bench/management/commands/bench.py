"""``manage.py bench``: what the cached counts buy and what they cost, side by side, in one run.

Eleven sections, each "A against B" on the same data in the same run (details in each module):

1. ``bench.listing`` — capture-set list page: cached columns vs. two per-request countings;
2. ``bench.writes`` — bulk_create, single-row saves, M2M add: count triggers on vs. off;
3. ``bench.recompute`` — 1,000 dirty sets: grouped drain vs. one recompute per set;
4. ``bench.burst`` — 10,000 single-row writes with a real worker: messages, time to exact counts;
5. ``bench.reconcile`` — a full reconcile pass, repair and dry, in target rows per second:
   ``counts.reconcile()`` vs. hand-written set-based statements (``bench.baseline``: one
   ``UPDATE … FROM (… GROUP BY …)`` per table plus the ledger and multiplicity checks), in one
   statement each and in the engine's chunks;
6. ``bench.incremental`` — drain time after small writes to the dataset itself (issue #11), and
   drain time per changed row, to compare across dataset sizes;
7. ``bench.drainers`` — time to empty a backlog of single-row writes on the largest set with
   1, 2 and 4 drainers (issue #27: more drainers must not make it slower);
8. ``bench.rebuild`` — ``counts.rebuild()`` from a lost state (every count 0, no ledger) vs. the
   same baseline in repair form, in a scratch copy of the database;
9. ``bench.backfill`` — adding one count (``--backfill-count``) to the scratch copy:
   ``counts.operate.backfill.backfill()`` vs. a hand-written chunked backfill, and the p99 commit
   latency of a concurrent single-row writer during each against idle; then the engine's again
   with the workers' drain loop running beside it, showing the drains keep up meanwhile;
10. ``bench.exact`` — a list page read exact against the stored columns, idle and with 1,000
   item and 100 delta marks pending (issue 24);
11. ``bench.shapes`` — one write's drain for the declaration shapes of issue 23 (three-level,
   filtered middle, FK filter) at 50k to 800k children, on the engine's test app: only when
   asked (``--sections shapes``), with ``COUNTS_TEST_APP=1`` in a database of its own.

It prints one table (medians over repeats, the machine's core count in the header), progress on
stderr, and with ``--json PATH`` every figure and sample; a PNG plot of list latency against
collection size goes to ``--plot`` (default ``bench/out/list_latency.png``).
``--plot-scaling A.json B.json …`` measures nothing: it plots drain time per changed row against
dataset size from the JSON of runs at different ``--scale`` (``--scaling-plot``, default
``bench/out/drain_per_row.png``).

**Which database.** Whatever ``DATABASE_URL`` names; use a dedicated one, e.g.
``DATABASE_URL=postgres://postgres@127.0.0.1:5432/countdown_bench``. A database with at least
``--scale`` captures is reused as is; an empty one is seeded with ``seed_demo --scale``; a
smaller, non-empty one is refused unless ``--reseed`` (which empties the monitoring tables).
The bench removes everything else it creates and drains the marks it leaves, so it ends with the
same rows it began with (plus the dataset, if it seeded one), counts exact and nothing pending.
Marks already pending when it starts are drained first (what a worker would do), so they cannot
disturb the figures. The tables it churns are ``VACUUM (ANALYZE)``-ed between steps (untimed),
so no sample pays for another's dead rows, whether autovacuum runs or not. Section 4 sends real
messages through ``REDIS_URL`` and runs a worker in this process; stop other workers on the same
database and namespace while it runs. Sections 8 and 9 wipe or clear the engine's state on purpose,
so they run in a copy (``CREATE DATABASE <name>_bench_scratch TEMPLATE <name>``, ``bench.scratch``),
made after the other sections and dropped at the end; PostgreSQL copies a database only while no
other client is connected to it (the bench waits up to two minutes for that).

Defaults (``--scale 200000``) take about five minutes on two cores (plus ~30 s to seed the first
time), two of them the incremental section, nearly all of that today's drains (which recount
whole sets) and the exactness checks; ``--scale 1000000`` adds the 500k-image set and took
about eight minutes before the incremental section, which should add about six more there
(estimated from today's drain times, not measured). At 10⁶ captures one repeat of the reconcile
section took about four minutes, of the rebuild section about six (three wipes, three
rebuilds, three exactness checks), of the backfill section about five. Leave a section out
with ``--sections``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import django
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import override_settings

from bench import (
    backfill,
    burst,
    dataset,
    drainers,
    exact,
    fullpath,
    incremental,
    listing,
    rebuild,
    recompute,
    reconcile,
    report,
    scratch,
    shapes,
    writes,
)

SECTIONS = (
    "list",
    "write",
    "recompute",
    "burst",
    "incremental",
    "drainers",
    "reconcile",
    "rebuild",
    "backfill",
    "exact",
    "shapes",
)
#: Sections run in the scratch copy of the database (``bench.scratch``).
SCRATCH_SECTIONS = ("rebuild", "backfill")
DEFAULT_PLOT = Path(settings.BASE_DIR) / "bench" / "out" / "list_latency.png"
DEFAULT_SCALING_PLOT = Path(settings.BASE_DIR) / "bench" / "out" / "drain_per_row.png"


def _ints(raw: str) -> list[int]:
    try:
        return sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError as exc:
        raise CommandError(f"expected comma-separated integers, got {raw!r}") from exc


class Command(BaseCommand):
    help = "Measure what the cached counts buy (list latency) and cost (writes), side by side."

    def add_arguments(self, parser):
        add = parser.add_argument
        add(
            "--scale",
            type=int,
            default=200_000,
            help="Captures the dataset needs (seeded if short)",
        )
        add("--seed", type=int, default=1, help="seed_demo seed when seeding")
        add("--reseed", action="store_true", help="Empty the monitoring tables and seed afresh")
        add("--repeats", type=int, default=7, help="Repeats for list, write and recompute")
        add(
            "--fullpath-repeats",
            type=int,
            default=21,
            help="Repeats of the single-row full-path write (short samples need more)",
        )
        add("--sizes", default="1000,10000,100000,500000", help="Capture-set sizes to list")
        add("--bulk", type=int, default=10_000, help="Detections in the bulk_create")
        add("--saves", type=int, default=1_000, help="Single-row saves")
        add("--m2m", type=int, default=100_000, help="Images in the M2M add")
        add("--recompute-sets", type=int, default=1_000, help="Dirty sets to recompute")
        add("--burst-writes", type=int, default=10_000, help="Single-row writes in a burst")
        add("--burst-sets", type=int, default=50, help="Capture sets the burst writes to")
        add("--burst-repeats", type=int, default=3, help="Bursts (p50/p99 over these)")
        add(
            "--reconcile-repeats",
            type=int,
            default=1,
            help="Repeats of the reconcile section (6 full passes each)",
        )
        add(
            "--rebuild-repeats",
            type=int,
            default=1,
            help="Repeats of the rebuild section (3 rebuilds from a wiped state each)",
        )
        add(
            "--backfill-repeats",
            type=int,
            default=1,
            help="Repeats of the backfill section (five samples: see bench.backfill)",
        )
        add(
            "--backfill-count",
            default=backfill.DEFAULT_COUNT,
            choices=backfill.SUPPORTED,
            help="The count the backfill section clears and adds again (label.column)",
        )
        add(
            "--backfill-idle",
            type=float,
            default=10.0,
            help="Seconds of each idle sample (drained or not) in the backfill section",
        )
        add("--incr-repeats", type=int, default=5, help="Repeats of each incremental case")
        add("--incr-singles", type=int, default=1_000, help="Single creates before one drain")
        add("--incr-rows", default="10,100,1000", help="Detections per bulk_create, per-row case")
        add("--drainers-writes", type=int, default=5_000, help="Backlog for the drainers section")
        add("--drainers-repeats", type=int, default=5, help="Repeats of each drainer count")
        add(
            "--shapes-sizes",
            default=",".join(str(n) for n in shapes.DEFAULT_SIZES),
            help="Children per target in the shapes section",
        )
        add("--shapes-repeats", type=int, default=7, help="Repeats of each shapes case")
        add(
            "--exact-size",
            type=int,
            default=100_000,
            help="Images of the large set on the exact-read section's page",
        )
        add("--exact-repeats", type=int, default=15, help="Repeats of each exact-read state")
        add(
            "--sections",
            default=",".join(s for s in SECTIONS if s != "shapes"),
            help="Subset of: " + ", ".join(SECTIONS) + " (shapes: only with COUNTS_TEST_APP=1)",
        )
        add("--json", dest="json_path", help="Write every figure and sample as JSON here")
        add("--plot", default=str(DEFAULT_PLOT), help="PNG of list latency ('' for none)")
        add(
            "--plot-scaling",
            nargs="+",
            metavar="JSON",
            help="Measure nothing: plot drain ms per changed row against dataset size from"
            " these runs' --json files",
        )
        add("--scaling-plot", default=str(DEFAULT_SCALING_PLOT), help="PNG of --plot-scaling")

    def log(self, message: str) -> None:
        self.stderr.write(f"[bench] {message}")

    def handle(self, *args, **o):
        if o["plot_scaling"]:
            return self.plot_scaling(o["plot_scaling"], o["scaling_plot"])
        sections = [s.strip() for s in o["sections"].split(",") if s.strip()]
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise CommandError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        repeats = (
            "repeats",
            "fullpath_repeats",
            "burst_repeats",
            "reconcile_repeats",
            "rebuild_repeats",
            "backfill_repeats",
        )
        counted = (*repeats, "incr_repeats", "shapes_repeats", "exact_repeats")
        if min(o[name] for name in counted) < 1:
            raise CommandError("repeats must be at least 1")
        if not o["backfill_idle"] > 0:
            raise CommandError("--backfill-idle must be a positive number of seconds")
        started = time.perf_counter()
        # Query logging (DEBUG) would weigh on every statement measured; the numbers should be
        # those of a production process.
        with override_settings(DEBUG=False):
            results = self.run(sections, o)
        results["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
        self.stdout.write(report.table(results))
        if o["json_path"]:
            report.write_json(o["json_path"], results)
            self.log(f"figures written to {o['json_path']}")
        if o["plot"] and results.get("list"):
            report.plot(o["plot"], results)
            self.log(f"plot written to {o['plot']}")
        return None

    def run(self, sections: list[str], o: dict) -> dict:
        if sections == ["shapes"]:  # the test app's tables only: no domain dataset
            shapes.require_test_app()
            found = {"rows": None, "seeded": False, "seed_seconds": 0}
            results = {"meta": self.meta(o, found, dataset.drain_all())}
            sizes = _ints(o["shapes_sizes"])
            results["shapes"] = shapes.measure(sizes, o["shapes_repeats"], self.log)
            return results
        if "shapes" in sections:
            shapes.require_test_app()
        pending = dataset.drain_all()
        found = dataset.ensure(o["scale"], o["seed"], o["reseed"], self.log)
        captures = found["rows"]["captures"]
        results: dict = {"meta": self.meta(o, found, pending)}
        asked = _ints(o["sizes"])
        sizes = [s for s in asked if 0 < s <= captures] or [captures]
        dropped = [s for s in asked if s not in sizes]
        if dropped:
            self.log(
                f"dropping capture-set sizes {', '.join(f'{s:,}' for s in dropped)}: larger than"
                f" the dataset's {captures:,} captures (raise --scale to measure them);"
                f" listing {', '.join(f'{s:,}' for s in sizes)}"
            )
        dataset.vacuum()
        try:
            if "list" in sections or "write" in sections:
                self.log(f"making capture sets of {', '.join(f'{s:,}' for s in sizes)} images")
                made = listing.setup(sizes)
                if "list" in sections:
                    results["list"] = listing.measure(made, o["repeats"], self.log)
                if "write" in sections:
                    results["write"] = writes.measure(
                        made[max(sizes)]["set"],
                        o["repeats"],
                        o["bulk"],
                        o["saves"],
                        min(o["m2m"], captures),
                        self.log,
                    )
                    results["write"]["full_path"] = fullpath.measure(
                        dataset.sample_images(200, salt=7), o["fullpath_repeats"], self.log
                    )
                self.tidy()
            if "recompute" in sections:
                new_set = recompute.new_set(o["repeats"], self.log)
                ids = recompute.setup(o["recompute_sets"])
                results["recompute"] = recompute.measure(ids, o["repeats"], self.log)
                results["recompute"]["new_set"] = new_set
                self.tidy()
            if "burst" in sections:
                sets, images = burst.setup(o["burst_sets"], o["burst_writes"])
                results["burst"] = burst.measure(
                    sets, images, o["burst_writes"], o["burst_repeats"], self.log
                )
                self.tidy()
            if "incremental" in sections:
                results["incremental"] = incremental.measure(
                    incremental.largest_set(),
                    captures,
                    o["incr_repeats"],
                    o["incr_singles"],
                    _ints(o["incr_rows"]),
                    self.log,
                )
            if "exact" in sections:
                size = min(o["exact_size"], max(1, captures - 3_000))
                results["exact"] = exact.measure(size, o["exact_repeats"], self.log)
                self.tidy()
            if "drainers" in sections:
                results["drainers"] = drainers.measure(
                    incremental.largest_set().pk,
                    o["drainers_writes"],
                    o["drainers_repeats"],
                    self.log,
                )
        finally:
            self.tidy()
        if "reconcile" in sections:
            results["reconcile"] = reconcile.measure(o["reconcile_repeats"], self.log)
        if "shapes" in sections:
            sizes = _ints(o["shapes_sizes"])
            results["shapes"] = shapes.measure(sizes, o["shapes_repeats"], self.log)
        wanted = [s for s in SCRATCH_SECTIONS if s in sections]
        if wanted:
            try:
                self.in_scratch_copy(wanted, o, results)
            except scratch.Unavailable as exc:
                # The other sections' figures stand; these say why they are missing.
                self.log(f"skipping {', '.join(wanted)}: {exc}")
                for section in wanted:
                    results[section] = {"skipped": str(exc)}
        return results

    def in_scratch_copy(self, wanted: list[str], o: dict, results: dict) -> None:
        with scratch.copy(self.log) as name:
            results["meta"]["scratch_database"] = name
            if "rebuild" in wanted:
                results["rebuild"] = rebuild.measure(o["rebuild_repeats"], self.log)
            if "backfill" in wanted:
                results["backfill"] = backfill.measure(
                    o["backfill_count"], o["backfill_repeats"], o["backfill_idle"], self.log
                )

    def plot_scaling(self, paths: list[str], out: str) -> None:
        """Per-row drain figures of several runs, as a table and a PNG."""
        runs = []
        for path in paths:
            try:
                runs.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as exc:
                raise CommandError(f"cannot read {path}: {exc}") from exc
        missing = [p for p, r in zip(paths, runs, strict=True) if not r.get("incremental")]
        if missing:
            raise CommandError(f"no incremental section in {', '.join(missing)}")
        self.stdout.write(report.scaling_table(runs))
        report.plot_scaling(out, runs)
        self.log(f"plot written to {out}")

    def tidy(self) -> None:
        """Remove the section's objects and their dead rows: each section measures the dataset
        plus its own objects only, never the leftovers of the one before."""
        if dataset.remove_bench_objects():
            dataset.vacuum()

    def meta(self, o: dict, found: dict, pending: int) -> dict:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('server_version'), current_setting('jit'),"
                " current_setting('shared_buffers'), current_setting('work_mem'),"
                " current_setting('synchronous_commit'), current_setting('autovacuum'),"
                " current_database()"
            )
            version, jit, shared_buffers, work_mem, sync, autovacuum, database = cursor.fetchone()
        return {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "django": django.get_version(),
            "postgres": {
                "version": version.split()[0],
                "jit": jit,
                "shared_buffers": shared_buffers,
                "work_mem": work_mem,
                "synchronous_commit": sync,
                "autovacuum": autovacuum,
            },
            "database": database,
            "scale": o["scale"],
            "seeded": found["seeded"],
            "seed_seconds": round(found["seed_seconds"], 1),
            "dataset": found["rows"],
            "marks_pending_at_start": pending,
            "repeats": o["repeats"],
            "options": {k: o[k] for k in sorted(o) if k not in ("stdout", "stderr")},
        }
