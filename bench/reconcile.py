"""Section: a full reconcile pass, the engine's against hand-written set-based statements.

Reconcile is the safety net for what triggers cannot see; how long a pass takes decides how
often the scheduler can afford one. Each repeat runs eight passes over every model of the
dataset (after the other sections' objects are gone), in an order rotated from one repeat to
the next so the machine's noise falls on all of them alike:

- **engine, repair**: ``counts.reconcile()`` — the item pass (every ledger of both item kinds
  brought to the truth, the taxa multiplicities audited), then every target row recounted,
  5,000 items and 1,000 targets per transaction, rows locked, drift written;
- **engine, dry**: ``counts.reconcile(dry_run=True)`` — the same comparisons, nothing locked or
  written;
- **engine on two connections**, repair and dry: the same passes with ``jobs=2``, each item
  kind and model cut into two key ranges run side by side (``counts.operate.parallel``): the
  engine runs its statements without PostgreSQL's parallel workers, the one-statement baseline
  with them;
- **baseline, one statement** (``bench.baseline``), repair and dry: per item kind one statement
  building every item's truth state and comparing it with ``counts_ledger`` (writing the
  differences), one for the multiplicities, and per target table one ``UPDATE … FROM (…
  GROUP BY …)`` (a ``SELECT`` comparing, when dry);
- **baseline, chunked**, repair and dry: the same statements over key ranges of the engine's
  chunk sizes, one transaction per chunk.

Every figure is **target rows per second** (the four target tables' rows over the pass's
seconds, ledgers included in the time) and the ratio engine ÷ baseline of the seconds. On a
database whose counts are exact every pass finds no drift and writes nothing; any drift found
is reported (and repaired, which is what the scheduler would do anyway), and the engine's and
the baseline's dry passes must agree on whether there is any. The engine's time is split by
phase (``bench.phases``) and the baseline's by statement, in the JSON.

Between passes the tables they read are ``VACUUM (ANALYZE)``-ed (untimed): the engine's repair
locks every ledger and target row it checks, which leaves each tuple's lock to be cleaned up by
the next reader, and no pass should pay for the one before.
"""

from __future__ import annotations

import counts
from bench import baseline
from bench.phases import Phases
from bench.timing import median, ratio, stopwatch

VARIANTS = (
    "engine_repair",
    "engine_dry",
    "parallel_repair",
    "parallel_dry",
    "baseline_repair",
    "baseline_dry",
    "chunked_repair",
    "chunked_dry",
)
#: Connections of the engine's parallel passes (``counts.reconcile(jobs=...)``): the two
#: cores of our smallest machines.
JOBS = 2
#: What the engine's passes read and lock (vacuumed between passes).
TABLES = (
    "counts_ledger",
    "counts_multiplicity",
    "counts_dirtymark",
    *(t.table for t in baseline.TABLES),
)


def vacuum() -> None:
    from bench import dataset

    dataset.vacuum(*TABLES)


def _engine(dry: bool, jobs: int = 1) -> dict:
    phases = Phases()
    with stopwatch() as sw, phases.watching():
        report = counts.reconcile(dry_run=dry, progress=phases.progress, jobs=jobs)
    return {
        "seconds": sw.seconds,
        "checked": report.checked,
        "drifted_rows": report.drifted_rows,
        "ledgers": {k: v.as_dict() for k, v in report.ledgers.items()},
        "models": {k: v.as_dict() for k, v in report.models.items()},
        # Phases side by side interleave their events: a split by phase means nothing then.
        "breakdown": phases.summary() if jobs == 1 else None,
    }


def _baseline(dry: bool, chunked: bool) -> dict:
    found = baseline.run_pass(dry=dry, chunked=chunked)
    return found.as_dict()


def run_variant(variant: str) -> dict:
    if variant.startswith("engine"):
        return _engine(dry=variant.endswith("dry"))
    if variant.startswith("parallel"):
        return _engine(dry=variant.endswith("dry"), jobs=JOBS)
    return _baseline(dry=variant.endswith("dry"), chunked=variant.startswith("chunked"))


def summarise(samples: dict[str, list[dict]], rows: int) -> dict[str, dict]:
    """Per variant: median seconds, rows/s, samples, and the last sample's details."""
    out = {}
    for variant, runs in samples.items():
        if not runs:
            continue
        seconds = median([r["seconds"] for r in runs])
        last = dict(runs[-1])
        last.pop("seconds")
        out[variant] = {
            "seconds": round(seconds, 3),
            "per_second": round(ratio(rows, seconds), 1),
            "samples_s": [round(r["seconds"], 3) for r in runs],
            "drifted_rows": sum(r["drifted_rows"] for r in runs),
            **{k: v for k, v in last.items() if k != "drifted_rows"},
        }
    return out


def measure(repeats: int, log) -> dict:
    rows = baseline.target_rows()
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(repeats):
        shift = rep % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            vacuum()
            found = run_variant(variant)
            samples[variant].append(found)
            log(
                f"reconcile {variant}: {found['seconds']:.1f} s,"
                f" {found['drifted_rows']} drifted target rows"
            )
    vacuum()
    variants = summarise(samples, rows)
    engine = variants["engine_repair"]
    dry_drift = {
        v: variants[v]["drifted_rows"] for v in ("engine_dry", "parallel_dry", "baseline_dry")
    }
    ledger_drift = sum(
        ledger["drifted_rows"]
        for run in samples["engine_dry"]
        for ledger in run["ledgers"].values()
    )
    base_ledger_drift = sum(
        run["ledgers_drifted"] + run["pairs_drifted"] for run in samples["baseline_dry"]
    )
    ratios = {
        f"{mode}{'_chunked' if chunked else ''}": round(
            ratio(
                variants[f"engine_{mode}"]["seconds"],
                variants[f"{'chunked' if chunked else 'baseline'}_{mode}"]["seconds"],
            ),
            2,
        )
        for mode in ("repair", "dry")
        for chunked in (False, True)
    }
    for mode in ("repair", "dry"):
        ratios[f"{mode}_parallel"] = round(
            ratio(variants[f"parallel_{mode}"]["seconds"], variants[f"baseline_{mode}"]["seconds"]),
            2,
        )
    out = {
        "repeats": repeats,
        "target_rows": rows,
        # The engine's repairing pass, as before (what the scheduler runs).
        "checked": engine["checked"],
        "seconds": engine["seconds"],
        "per_second": engine["per_second"],
        "drifted_rows": engine["drifted_rows"],
        "variants": variants,
        "ratios": ratios,
        # Both dry passes see drift, or neither does (targets, ledgers and pairs alike).
        "agree": (dry_drift["engine_dry"] == 0)
        == (dry_drift["parallel_dry"] == 0)
        == (dry_drift["baseline_dry"] == 0)
        and (ledger_drift == 0) == (base_ledger_drift == 0),
        "jobs": JOBS,
        "chunks": {"items": baseline.ITEM_CHUNK, "targets": baseline.TARGET_CHUNK},
    }
    log(
        f"reconcile: {rows:,} target rows; repair engine {engine['seconds']:.1f} s"
        f" ({engine['per_second']:,.0f}/s) vs baseline"
        f" {variants['baseline_repair']['seconds']:.1f} s ({ratios['repair']:.2f}x),"
        f" chunked {variants['chunked_repair']['seconds']:.1f} s"
        f" ({ratios['repair_chunked']:.2f}x); dry engine"
        f" {variants['engine_dry']['seconds']:.1f} s vs"
        f" {variants['baseline_dry']['seconds']:.1f} s ({ratios['dry']:.2f}x),"
        f" chunked {variants['chunked_dry']['seconds']:.1f} s ({ratios['dry_chunked']:.2f}x);"
        f" on {JOBS} connections repair {variants['parallel_repair']['seconds']:.1f} s"
        f" ({ratios['repair_parallel']:.2f}x), dry {variants['parallel_dry']['seconds']:.1f} s"
        f" ({ratios['dry_parallel']:.2f}x); {engine['drifted_rows']} drifted"
    )
    return out
