"""What an executed statement read, per ``EXPLAIN (ANALYZE)``: for tests that pin a plan's
cost to the rows it serves (a scan of a whole table, or a subquery re-run per row, shows)."""

from __future__ import annotations

import json
from collections import Counter

from django.db import connection

from project.monitoring.models import Deployment, Project


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


def crowd(captures: int, detected_every: int | None = 1) -> list[int]:
    """A station of its own (its own project) with ``captures`` captures, every
    ``detected_every``-th of them with one valid detection (none when None), inserted set-based:
    a table a plan reading too much shows on. Their ids, in order."""
    project = Project.objects.create(name="Crowd", default_filters_score_threshold=0.5)
    station = Deployment.objects.create(project=project, name="Crowd")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_sourceimage (deployment_id, timestamp, path, created_at,"
            " updated_at) SELECT %s, now(), 'crowd', now(), now()"
            " FROM generate_series(1, %s) RETURNING id",
            [station.pk, captures],
        )
        ids = sorted(row[0] for row in cursor.fetchall())
        if detected_every is not None:
            cursor.execute(
                "INSERT INTO monitoring_detection (source_image_id, bbox, created_at,"
                " updated_at) SELECT unnest(%s::bigint[]), '[1, 1, 2, 2]', now(), now()",
                [ids[::detected_every]],
            )
    return ids
