"""``manage.py counts status|reconcile|rebuild|drain|makemigrations``: the operator's handle.

- ``status``: pending marks per target model (with the age of the oldest, and of the oldest
  due) and whether every count trigger is INSTALLED, OUTDATED or MISSING; exit 1 when
  PostgreSQL or Redis does not answer, 2 when a model's oldest due mark has waited longer than
  ``COUNTS_STALE_ALERT_S``, the scheduler was not seen within ``COUNTS_SCHEDULER_STALE_S`` or
  no worker within two heartbeats (for an alert);
- ``reconcile [--dry-run] [--model LABEL] [--chunk N] [--jobs N] [--json]``: find drift, repair
  it (``--jobs``: on N connections side by side, ``counts.operate.parallel``);
- ``rebuild [--model LABEL] [--jobs N]``: recompute every row (``counts.rebuild``: a reconcile
  that prints less and drops the marks it made redundant);
- ``drain [--until-empty]``: drain marks in this process (no workers needed);
- ``makemigrations [--check]``: the count-trigger migration, if one is due.

``reconcile`` and ``rebuild`` show their progress on stderr (``counts.operate.progress``): a bar
per model (several at once with ``--jobs``) on a terminal, one line per model when it finishes
elsewhere; stdout carries only the report (with ``--json``, only the JSON).
"""

import argparse
import json
import sys

from django.core.management.base import BaseCommand, CommandError

from counts.base.errors import CountsError
from counts.base.signals import reconciled
from counts.management.migrations_writer import mode_change_notices, pending_migrations, write
from counts.operate import reconciling
from counts.operate.progress import command_progress
from counts.operate.status import stale_alert_s, status, unreachable_in_one_line
from counts.run.draining import BATCH_SIZE, drain


class Command(BaseCommand):
    help = "Inspect and maintain cached counts."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        status = sub.add_parser(
            "status", help="Pending marks, queues, processes last seen and trigger state"
        )
        status.add_argument("--json", action="store_true", help="Print the report as JSON")
        for name in ("reconcile", "rebuild"):
            p = sub.add_parser(name, help=f"{name.title()} cached counts")
            p.add_argument(
                "--model", help="Only this model's counts, by label (e.g. monitoring.event)"
            )
            p.add_argument(
                "--chunk",
                type=int,
                default=5000,
                help="Most rows per transaction (default 5000; fewer where rows are costly)",
            )
            p.add_argument(
                "--jobs",
                type=_positive,
                default=1,
                help="Connections to run the pass on, each over its own key ranges (default 1;"
                " more finish sooner on a server with cores to spare)",
            )
            p.add_argument(
                "--json",
                action="store_true",
                help="Print the report as JSON on stdout (progress stays on stderr)",
            )
            if name == "reconcile":
                p.add_argument(
                    "--dry-run", action="store_true", help="Report drift without repairing it"
                )
        drain = sub.add_parser("drain", help="Drain dirty marks in this process")
        drain.add_argument(
            "--until-empty", action="store_true", help="Keep draining until no mark is left"
        )
        drain.add_argument(
            "--batch-size",
            type=int,
            default=BATCH_SIZE,
            help=f"Marks per drain transaction (default {BATCH_SIZE})",
        )
        mm = sub.add_parser("makemigrations", help="Write the count-trigger migration if due")
        mm.add_argument(
            "--check",
            action="store_true",
            help="Write nothing; exit 1 if a migration is due (for CI)",
        )

    def handle(self, *args, action, **options):
        # ("status" reports a database that does not answer itself, beside what Redis says.)
        with unreachable_in_one_line():
            try:
                getattr(self, f"do_{action}")(**options)
            except CountsError as exc:
                raise CommandError(str(exc)) from exc

    def do_status(self, json=False, **_):
        report = status()
        unreachable = report["unreachable"]
        if json:
            self.stdout.write(_dumps(report))
        else:
            if "Redis" in unreachable:
                report["queues"] = None  # its one line below says more than a queue row
            self._print_status(report)
        for line in unreachable.values():
            self.stderr.write(line)
        limit = stale_alert_s()
        for label, seconds in sorted(report["stale"].items()):
            self.stderr.write(
                f"{label}: its oldest due mark has waited {seconds:.0f} s, over"
                f" COUNTS_STALE_ALERT_S ({limit} s): are workers and the scheduler running?"
            )
        for role in report.get("stale_processes", []):
            self.stderr.write(f"{role}: no live {role} process seen (see Processes above)")
        if unreachable:
            sys.exit(1)
        if report["stale"] or report.get("stale_processes"):
            sys.exit(2)

    def _print_status(self, report: dict) -> None:
        self.stdout.write("Counts:")
        for row in report.get("modes", []):
            how = {"item": f"item ({row.get('items')})", "full": f"full: {row.get('why')}"}
            self.stdout.write(f"  {row['count']:<58} {how.get(row['mode'], row['mode'])}")
        if report["pending"] is not None:
            self.stdout.write("Pending marks:")
            if not report["pending"]:
                self.stdout.write("  none")
            for row in report["pending"]:
                ids = "every row" if row["ids"] is None else f"{row['ids']} ids"
                self.stdout.write(
                    f"  {row['label']:<40} {row['marks']:>7} marks  {ids:>12}"
                    f"  oldest {row['oldest_seconds']:.1f}s"
                    f"  oldest due {row['oldest_due_seconds']:.1f}s"
                )
        for section, title in (("queues", "Queues"), ("processes", "Processes")):
            if report.get(section) is not None:
                self.stdout.write(f"{title}:")
                for name, value in report[section].items():
                    self.stdout.write(f"  {name:<40} {value}")
        if report["triggers"] is not None:
            self.stdout.write("Triggers:")
            for row in report["triggers"]:
                self.stdout.write(f"  {row['state']:<10} {row['table']}.{row['name']}")
        if report.get("job_indexes"):
            self.stdout.write("Setting changes (jobs) walk:")
            for row in report["job_indexes"]:
                columns = ", ".join(row["columns"])
                where = row["index"] or "no index: each change reads every item of a link"
                self.stdout.write(f"  {row['state']:<10} {row['table']} ({columns}): {where}")

    def _run_reconcile(self, model, chunk, dry_run, jobs, rebuild=False):
        # Progress goes to stderr only (a bar on a terminal, a line per model elsewhere):
        # stdout carries the report, which --json tooling parses.
        with command_progress(self.stderr._out, model, jobs) as progress:
            if rebuild:
                return reconciling.rebuild(model, chunk=chunk, progress=progress, jobs=jobs)
            return reconciling.reconcile(
                model=model, dry_run=dry_run, chunk=chunk, progress=progress, jobs=jobs
            )

    def do_reconcile(self, model=None, chunk=5000, dry_run=False, json=False, jobs=1, **_):
        report = self._run_reconcile(model, chunk, dry_run, jobs)
        reconciled.send(sender=type(self), report=report)
        if json:
            self.stdout.write(_dumps(report.as_dict()))
            return
        verb = "would repair" if dry_run else "repaired"
        for label, m in report.models.items():
            fields = ", ".join(f"{f}={n}" for f, n in sorted(m.drift.items())) or "no drift"
            self.stdout.write(f"{label}: {m.checked} checked, {m.drifted_rows} {verb} ({fields})")
        self.stdout.write(
            f"{report.checked} rows in {report.seconds:.1f}s"
            f" ({report.checked / max(report.seconds, 1e-9):.0f} rows/s)"
        )

    def do_rebuild(self, model=None, chunk=5000, json=False, jobs=1, **_):
        report = self._run_reconcile(model, chunk, False, jobs, rebuild=True)
        if json:
            self.stdout.write(_dumps(report.as_dict()))
        else:
            self.stdout.write(f"Rebuilt {report.checked} rows ({report.drifted_rows} changed)")

    def do_drain(self, until_empty=False, batch_size=BATCH_SIZE, **_):
        total = 0
        while True:
            result = drain(batch_size=batch_size)
            total += result.marks
            if result.marks:
                self.stdout.write(_dumps(result.as_log()))
            if not result.more or not until_empty:
                break
        self.stdout.write(f"Drained {total} marks")

    def do_makemigrations(self, check=False, **_):
        pending = pending_migrations()
        if not pending:
            self.stdout.write("Count triggers are in sync with the declarations.")
            return
        for line in mode_change_notices():
            self.stderr.write(self.style.WARNING(f"Count kept another way: {line}"))
        if check:
            for app_label, migration in pending:
                self.stderr.write(
                    f"Count triggers out of date: {app_label}.{migration.name} needed"
                )
            sys.exit(1)
        for app_label, migration in pending:
            self.stdout.write(f"Wrote {write(app_label, migration)}")


def _dumps(data) -> str:
    return json.dumps(data, indent=2, default=str)


def _positive(text: str) -> int:
    """An argument that must be a whole number of at least 1 (``--jobs``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
