"""Section: rebuilding every count from a lost state, the engine's against the baseline's repair.

On a database whose counts are exact ``counts.rebuild()`` is the reconcile section's repairing
pass (plus deleting the marks it covered) and writes nothing; what a rebuild is *for* is a
state to write from scratch: a restore without the engine's tables, a bulk load with the
triggers off. So each sample starts from that state, made in the bench's scratch copy of the
database (``bench.scratch``, never the dataset itself): every cached column set to 0 (with the
engine's setting, so the column guards let it through and no trigger marks anything), and
``counts_ledger`` and ``counts_multiplicity`` emptied, then ``VACUUM (ANALYZE)`` (untimed).
Then, in an order rotated from one repeat to the next:

- **engine**: ``counts.rebuild()`` — the item pass creates and fills every ledger and credits
  the targets as it goes (5,000 items per transaction), the multiplicities are rebuilt from the
  ledgers, then every target row is recounted (1,000 per transaction) and the own-row counts
  written;
- **engine on two connections**: ``counts.rebuild(jobs=2)``, each item kind and model cut
  into two key ranges run side by side (``counts.operate.parallel``);
- **baseline, one statement** (``bench.baseline`` in repair form): per item kind one statement
  inserting every ledger, one for the multiplicities, per table one ``UPDATE … FROM (… GROUP
  BY …)`` writing the counts;
- **baseline, chunked**: the same in the engine's chunks, one transaction each.

Each must leave the copy exact, checked by the *other* side: after the engine, the baseline's
dry pass (one statement) must find no count, ledger or multiplicity differing and no mark
pending; after a baseline, ``counts.reconcile(dry_run=True)`` must find no drift. Both sides
write the same rows, so the ratio engine ÷ baseline of the seconds compares the same work.
Figures: target rows per second (the four target tables' rows over the seconds).
"""

from __future__ import annotations

from django.db import connection, transaction

import counts
from bench import baseline
from bench.phases import Phases
from bench.reconcile import JOBS, vacuum
from bench.timing import median, ratio, stopwatch
from counts.base.names import ENGINE_SETTING, LEDGER_TABLE
from counts.run.marks import has_pending
from counts.run.multiplicity import TABLE as MULTIPLICITY_TABLE

VARIANTS = ("engine", "parallel", "baseline", "chunked")


def wipe() -> None:
    """Every cached column 0, no ledger, no multiplicity: the engine's state lost."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config(%s, 'on', true)", [ENGINE_SETTING])
        for t in baseline.TABLES:
            cursor.execute(
                f"UPDATE {t.table} SET {', '.join(f'{c} = 0' for c in t.columns)}"
                f" WHERE {' OR '.join(f'{c} <> 0' for c in t.columns)}"
            )
        cursor.execute(f"TRUNCATE {LEDGER_TABLE}, {MULTIPLICITY_TABLE}")
    vacuum()


def _engine(jobs: int = 1) -> dict:
    phases = Phases()
    with stopwatch() as sw, phases.watching():
        report = counts.rebuild(progress=phases.progress, jobs=jobs)
    return {
        "seconds": sw.seconds,
        "drifted_rows": report.drifted_rows,
        "ledgers_written": sum(v.drifted_rows for v in report.ledgers.values()),
        # Phases side by side interleave their events: a split by phase means nothing then.
        "breakdown": phases.summary() if jobs == 1 else None,
    }


def _baseline(chunked: bool) -> dict:
    found = baseline.run_pass(dry=False, chunked=chunked).as_dict()
    return {
        "seconds": found["seconds"],
        "drifted_rows": found["drifted_rows"],
        "ledgers_written": found["ledgers_drifted"],
        "pairs_written": found["pairs_drifted"],
        "transactions": found["transactions"],
        "phases_s": found["phases_s"],
    }


def exact_by_baseline() -> bool:
    found = baseline.run_pass(dry=True, chunked=False)
    return (
        found.drifted_rows == 0
        and found.ledgers_drifted == 0
        and found.pairs_drifted == 0
        and not has_pending()
    )


def exact_by_engine() -> bool:
    report = counts.reconcile(dry_run=True)
    ledgers = sum(v.drifted_rows + sum(v.drift.values()) for v in report.ledgers.values())
    return report.drifted_rows == 0 and ledgers == 0 and not has_pending()


def measure(repeats: int, log) -> dict:
    rows = baseline.target_rows()
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    exact = True
    for rep in range(repeats):
        shift = rep % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            wipe()
            engine = variant in ("engine", "parallel")
            if engine:
                found = _engine(JOBS if variant == "parallel" else 1)
            else:
                found = _baseline(variant == "chunked")
            ok = exact_by_baseline() if engine else exact_by_engine()
            found["exact"] = ok
            exact = exact and ok
            samples[variant].append(found)
            log(
                f"rebuild {variant}: {found['seconds']:.1f} s, {found['ledgers_written']:,}"
                f" ledgers written" + ("" if ok else "  (NOT EXACT)")
            )
    vacuum()
    variants = {}
    for variant, runs in samples.items():
        seconds = median([r["seconds"] for r in runs])
        last = {k: v for k, v in runs[-1].items() if k != "seconds"}
        variants[variant] = {
            "seconds": round(seconds, 3),
            "per_second": round(ratio(rows, seconds), 1),
            "samples_s": [round(r["seconds"], 3) for r in runs],
            **last,
        }
    engine = variants["engine"]["seconds"]
    out = {
        "repeats": repeats,
        "target_rows": rows,
        "start": "every cached column 0, counts_ledger and counts_multiplicity empty",
        "variants": variants,
        "ratios": {
            "baseline": round(ratio(engine, variants["baseline"]["seconds"]), 2),
            "chunked": round(ratio(engine, variants["chunked"]["seconds"]), 2),
            "parallel": round(
                ratio(variants["parallel"]["seconds"], variants["baseline"]["seconds"]), 2
            ),
        },
        "jobs": JOBS,
        "exact": exact,
    }
    log(
        f"rebuild: {rows:,} target rows; engine {engine:.1f} s vs baseline"
        f" {variants['baseline']['seconds']:.1f} s ({out['ratios']['baseline']:.2f}x), chunked"
        f" {variants['chunked']['seconds']:.1f} s ({out['ratios']['chunked']:.2f}x); on {JOBS}"
        f" connections {variants['parallel']['seconds']:.1f} s"
        f" ({out['ratios']['parallel']:.2f}x the one-statement baseline)"
        + ("" if exact else "  (NOT EXACT)")
    )
    return out
