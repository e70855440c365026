"""Section 5: how fast a full reconcile pass checks the whole dataset.

Reconcile is the safety net for what triggers cannot see; how long a pass takes decides how
often the scheduler can afford one. The bench runs the real thing, ``counts.reconcile()`` in
repair mode, one target model at a time so each gets its own throughput, after its own objects
are gone (so "the whole dataset" is the seeded data only). On a database whose counts are exact
it finds no drift and writes nothing; any drift it does find is reported (and repaired, which is
what the scheduler would do anyway).
"""

from __future__ import annotations

import counts
from bench.timing import median, ratio
from counts.apps import graph


def measure(repeats: int, log) -> dict:
    per_model: dict[str, dict] = {}
    drifted = 0
    for label in sorted(graph().targets):
        seconds = []
        for _ in range(repeats):
            report = counts.reconcile(model=label)
            seconds.append(report.seconds)
            drifted += report.drifted_rows
        checked = report.checked
        per_model[label] = {
            "checked": checked,
            "seconds": round(median(seconds), 3),
            "per_second": round(ratio(checked, median(seconds)), 1),
            "samples_s": [round(s, 3) for s in seconds],
        }
    checked = sum(m["checked"] for m in per_model.values())
    seconds = sum(m["seconds"] for m in per_model.values())
    out = {
        "repeats": repeats,
        "checked": checked,
        "seconds": round(seconds, 3),
        "per_second": round(ratio(checked, seconds), 1),
        "drifted_rows": drifted,
        "models": per_model,
    }
    log(
        f"reconcile: {checked:,} targets in {seconds:.1f} s ({out['per_second']:,.0f}/s),"
        f" {drifted} drifted"
    )
    return out
