"""What an executed statement read, per ``EXPLAIN (ANALYZE)``: for tests that pin a plan's
cost to the rows it serves (a scan of a whole table, or a subquery re-run per row, shows)."""

from __future__ import annotations

import json
from collections import Counter


def plan_reads(cursor, sql: str, params) -> tuple[Counter, int]:
    """``(rows each relation's scans looked at, kept or filtered out, over all their loops;
    rows every join threw away)``, running ``sql`` once."""
    cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
    plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    scanned: Counter = Counter()
    thrown = 0

    def walk(node):
        nonlocal thrown
        loops = node["Actual Loops"]
        thrown += node.get("Rows Removed by Join Filter", 0) * loops
        if "Relation Name" in node:
            looked = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            looked += node.get("Rows Removed by Index Recheck", 0)
            scanned[node["Relation Name"]] += looked * loops
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    return scanned, thrown
