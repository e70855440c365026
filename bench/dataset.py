"""The data the bench measures on: a seeded dataset it reuses, and its own objects around it.

Why this split: seeding 10⁶ captures costs minutes, measuring should not. So the dataset (what
``seed_demo`` builds) is created once and *reused* by later runs against the same database; the
bench only seeds when the database holds fewer captures than ``--scale`` asks for, and only into
an empty database (or after ``--reseed``, which empties the monitoring tables first). Point
``DATABASE_URL`` at a dedicated database (``countdown_bench``) and it stays ready between runs.

Everything else a run writes — capture sets of exact sizes, 1,000 small sets, burst targets —
hangs off projects whose names start with :data:`PREFIX`. They are deleted at the end of a run
(and at the start of the next one, should a run have died), and the marks their deletion leaves
are drained, so the database ends as it began: same rows, counts exact, no mark pending. The
incremental section alone writes into the dataset itself (a few detections, members and a
threshold, each undone right after its sample); its detections carry :data:`BENCH_SCORE`, so
the start of a run deletes those an interrupted one left.

Bench writes go through :class:`counts.run.notice.quiet`: the triggers still write their marks (the
bench drains them itself, synchronously), but no recompute message is sent to Redis. Only the
burst section (``bench.burst``) writes loudly, because messages are what it measures.
"""

from __future__ import annotations

import io
import time

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from counts.api import drain_until_empty
from counts.run.marks import pending_ids
from counts.run.notice import quiet
from project.monitoring.models import Detection, Project, SourceImageCollection

#: Name prefix of every project the bench creates (and deletes).
PREFIX = "bench: "
#: ``Detection.score`` of the detections the incremental section adds to the dataset (and
#: deletes); real scores are 0-1 or NULL.
BENCH_SCORE = -1.0
COLLECTION = "monitoring.sourceimagecollection"
THROUGH = SourceImageCollection.images.through._meta.db_table
_TABLES = {
    "projects": "monitoring_project",
    "stations": "monitoring_deployment",
    "nights": "monitoring_event",
    "captures": "monitoring_sourceimage",
    "detections": "monitoring_detection",
    "occurrences": "monitoring_occurrence",
    "capture_sets": "monitoring_sourceimagecollection",
    "memberships": THROUGH,
}
#: Tables ``--reseed`` empties (CASCADE reaches the rest).
_RESEED = ("monitoring_project", "monitoring_taxon")


def rows() -> dict[str, int]:
    """Rows per table of the dataset, bench objects excluded (there are none between runs)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in _TABLES.values())
        )
        return dict(zip(_TABLES, cursor.fetchone(), strict=True))


def ensure(scale: int, seed: int, reseed: bool, log) -> dict:
    """Reuse the dataset when it has ``scale`` captures or more; otherwise seed one.

    Returns what was found or made: ``{"seeded": bool, "seed_seconds": float, "rows": {...}}``.
    """
    remove_bench_objects()
    remove_bench_detections()
    found = rows()
    if found["captures"] >= scale and not reseed:
        log(f"reusing the dataset: {found['captures']:,} captures (>= --scale {scale:,})")
        return {"seeded": False, "seed_seconds": 0.0, "rows": found}
    if found["projects"] and not reseed:
        raise CommandError(
            f"the database holds {found['captures']:,} captures, fewer than --scale {scale:,},"
            " and other data: point DATABASE_URL at a dedicated bench database, lower --scale,"
            " or pass --reseed to empty the monitoring tables and seed afresh"
        )
    started = time.perf_counter()
    if found["projects"]:
        log("--reseed: emptying the monitoring tables")
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {', '.join(_RESEED)} CASCADE")
    log(f"seeding {scale:,} captures with seed_demo (seed {seed})")
    output = io.StringIO()
    call_command("seed_demo", scale=scale, seed=seed, stdout=output)
    log(output.getvalue().strip())
    drain_all()  # the TRUNCATE's "every row" marks, if any
    return {"seeded": True, "seed_seconds": time.perf_counter() - started, "rows": rows()}


def drain_all(limit: int = 100_000) -> int:
    """Drain marks in this process until none is left; returns the marks consumed."""
    return sum(result.marks for result in drain_until_empty(limit))


def new_project(name: str) -> int:
    """A public project: the bench's anonymous client reads it as any visitor would, through
    the same access scoping as a member's request."""
    with quiet():
        return Project.objects.create(name=PREFIX + name, is_public=True).pk


def new_sets(project_id: int, names: list[str]) -> list[int]:
    """Empty capture sets in one INSERT; returns their ids in the order of ``names``."""
    with quiet():
        made = SourceImageCollection.objects.bulk_create(
            SourceImageCollection(project_id=project_id, name=n) for n in names
        )
    return [c.pk for c in made]


def sample_images(n: int, salt: int = 0) -> list[int]:
    """``n`` capture ids scattered over the whole table, the same ones every run.

    Real capture sets are random samples or whole stations, not the first ids: ordering by a
    hash of the id spreads members over the heap as a sample's would, so the annotation
    queries pay for the random reads they would pay in production.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM monitoring_sourceimage ORDER BY hashint8extended(id, %s), id LIMIT %s",
            [salt, n],
        )
        return [row[0] for row in cursor.fetchall()]


def add_members(set_ids: list[int], image_ids: list[int]) -> int:
    """Insert memberships ``(set_ids[i], image_ids[i])`` in one statement (one mark)."""
    if not set_ids:
        return 0
    with quiet(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {THROUGH} (sourceimagecollection_id, sourceimage_id)"
            " SELECT * FROM unnest(%s::bigint[], %s::bigint[]) ON CONFLICT DO NOTHING",
            [set_ids, image_ids],
        )
        return cursor.rowcount


#: Tables whose dead rows the bench makes (rolled-back samples, deletions, recomputes, marks).
CHURNED = (
    THROUGH,
    "monitoring_sourceimagecollection",
    "monitoring_detection",
    "monitoring_sourceimage",
    "counts_dirtymark",
)


def vacuum(*tables: str) -> None:
    """``VACUUM (ANALYZE)`` the tables a step churned (all of :data:`CHURNED` by default).

    Samples must not pay for the dead rows of the samples before them, and figures must not
    depend on whether, or when, autovacuum happens to run (it was switched off on the machine
    this was written on). Vacuuming between steps, untimed, makes every sample start from the
    same clean tables and fresh planner statistics.
    """
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM (ANALYZE) {', '.join(tables or CHURNED)}")


def remove_bench_objects() -> int:
    """Delete every project the bench made, their sets and memberships; drain what that marks.

    Plain SQL rather than the ORM's collector, which would load 500k membership rows into
    Python before deleting them.
    """
    with quiet(), connection.cursor() as cursor:
        cursor.execute("SELECT id FROM monitoring_project WHERE name LIKE %s", [PREFIX + "%"])
        projects = [row[0] for row in cursor.fetchall()]
        if not projects:
            return 0
        cursor.execute(
            f"DELETE FROM {THROUGH} WHERE sourceimagecollection_id IN"
            " (SELECT id FROM monitoring_sourceimagecollection WHERE project_id = ANY(%s))",
            [projects],
        )
        cursor.execute(
            "DELETE FROM monitoring_sourceimagecollection WHERE project_id = ANY(%s)", [projects]
        )
        cursor.execute("DELETE FROM monitoring_project WHERE id = ANY(%s)", [projects])
    drain_all()
    return len(projects)


def remove_bench_detections() -> int:
    """Delete the detections an interrupted incremental section left in the dataset; drain
    what that marks. (Once per run: ``score`` has no index, so this reads every detection.)"""
    with quiet():
        deleted, _ = Detection.objects.filter(score=BENCH_SCORE).delete()
    if deleted:
        drain_all()
    return deleted


# --- The truth about capture sets, written independently of the engine ------------------------

#: Set sizes are skewed (a few sets hold half of all captures), so a join the planner sizes by
#: the average set would hash whole tables for every set; ``EXISTS`` probes per member inside
#: the aggregate stay on the indexes whatever the estimate.
_TRUTH = f"""
SELECT c.id, count(m.sourceimage_id),
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM monitoring_detection d
                        WHERE d.source_image_id = m.sourceimage_id AND d.bbox IS NOT NULL)),
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM monitoring_detection d
                        WHERE d.source_image_id = m.sourceimage_id))
FROM unnest(%s::bigint[]) AS c(id)
LEFT JOIN {THROUGH} m ON m.sourceimagecollection_id = c.id
GROUP BY c.id ORDER BY c.id
"""
_CACHED = """
SELECT id, source_images_count, source_images_with_detections_count,
       source_images_processed_count
FROM monitoring_sourceimagecollection WHERE id = ANY(%s) ORDER BY id
"""


def set_counts(ids: list[int], *, truth: bool) -> dict[int, tuple[int, int, int]]:
    """``{set id: (images, with detections, processed)}``, stored (``truth=False``) or true."""
    with transaction.atomic(), connection.cursor() as cursor:
        # The skew-proof plan above is estimated as costly; JIT-compiling it would take longer
        # than running it, and this query is polled while the burst waits for exact counts.
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(_TRUTH if truth else _CACHED, [ids])
        return {row[0]: tuple(row[1:]) for row in cursor.fetchall()}


def sets_exact(ids: list[int]) -> bool:
    """Every stored count of these sets equals the truth, and no mark waits for them."""
    if pending_ids(COLLECTION, ids):
        return False
    return set_counts(ids, truth=False) == set_counts(ids, truth=True)


#: Per set: distinct counted occurrences on its captures, and their distinct taxa, each judged
#: by the threshold of the occurrence's own project.
_OCCURRENCE_TRUTH = f"""
SELECT c.id, count(DISTINCT o.id), count(DISTINCT o.determination_id)
FROM unnest(%s::bigint[]) AS c(id)
LEFT JOIN {THROUGH} m ON m.sourceimagecollection_id = c.id
LEFT JOIN monitoring_detection d ON d.source_image_id = m.sourceimage_id
LEFT JOIN monitoring_occurrence o ON o.id = d.occurrence_id AND o.determination_score >= (
    SELECT p.default_filters_score_threshold FROM monitoring_deployment od
    JOIN monitoring_project p ON p.id = od.project_id WHERE od.id = o.deployment_id)
GROUP BY c.id ORDER BY c.id
"""
_OCCURRENCE_CACHED = """
SELECT id, occurrences_count, taxa_count FROM monitoring_sourceimagecollection
WHERE id = ANY(%s) ORDER BY id
"""


def set_occurrence_counts(ids: list[int]) -> dict[int, tuple[int, int]]:
    """``{set id: (occurrences, taxa)}``, the truth."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(_OCCURRENCE_TRUTH, [ids])
        return {row[0]: tuple(row[1:]) for row in cursor.fetchall()}


def set_occurrences_exact(ids: list[int]) -> bool:
    """The sets' stored ``occurrences_count`` and ``taxa_count`` equal the truth, and no mark
    waits for them (one pass over each set's captures and their detections: seconds for a
    500k set, so only where a case changed them)."""
    if pending_ids(COLLECTION, ids):
        return False
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(_OCCURRENCE_TRUTH, [ids])
        truth = cursor.fetchall()
        cursor.execute(_OCCURRENCE_CACHED, [ids])
        return cursor.fetchall() == truth


def counted_occurrences_off(set_id: int, n: int, salt: int) -> list[int]:
    """``n`` counted occurrences with a taxon and no detection on the set's captures,
    hash-ordered: a detection joining one changes the set's ``occurrences_count``. Drawn from
    one occurrence in 50, to keep the search short at 10⁷."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT o.id FROM monitoring_occurrence o
            JOIN monitoring_deployment od ON od.id = o.deployment_id
            JOIN monitoring_project p ON p.id = od.project_id
            WHERE o.id %% 50 = %s AND o.determination_id IS NOT NULL
              AND o.determination_score >= p.default_filters_score_threshold
              AND NOT EXISTS (SELECT 1 FROM monitoring_detection d JOIN {THROUGH} m
                  ON m.sourceimage_id = d.source_image_id AND m.sourceimagecollection_id = %s
                  WHERE d.occurrence_id = o.id)
            ORDER BY hashint8extended(o.id, %s), o.id LIMIT %s
            """,
            [salt % 50, set_id, salt, n],
        )
        return [row[0] for row in cursor.fetchall()]


# --- The truth about what the incremental section touched (``bench.incremental``) -------------


#: Valid detections of capture ``s``: one index probe (see :func:`images_exact`).
_VALID_OF_S = (
    "(SELECT count(*) FROM monitoring_detection d"
    " WHERE d.source_image_id = s.id AND d.bbox IS NOT NULL)"
)
_IMAGES_WRONG = f"""
WITH img AS (SELECT id, event_id, deployment_id FROM monitoring_sourceimage WHERE id = ANY(%s))
SELECT (SELECT count(*) FROM monitoring_sourceimage s
        WHERE s.id IN (SELECT id FROM img) AND s.detections_count <> {_VALID_OF_S})
     + (SELECT count(*) FROM monitoring_event e
        WHERE e.id IN (SELECT event_id FROM img) AND e.detections_count <> coalesce(
          (SELECT sum({_VALID_OF_S}) FROM monitoring_sourceimage s WHERE s.event_id = e.id), 0))
     + (SELECT count(*) FROM monitoring_deployment p
        WHERE p.id IN (SELECT deployment_id FROM img) AND p.detections_count <> coalesce(
          (SELECT sum({_VALID_OF_S}) FROM monitoring_sourceimage s WHERE s.deployment_id = p.id),
          0))
"""


def images_exact(image_ids: list[int]) -> bool:
    """Stored ``detections_count`` of the captures, of their nights and of their stations
    equal counts of valid detections made here.

    Counted capture by capture, one index probe each: a station holds a few percent of all
    captures, and the hash join the planner would pick instead reads every detection.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")  # compiling costs more than these probes
        cursor.execute(_IMAGES_WRONG, [image_ids])
        return cursor.fetchone()[0] == 0


def threshold_exact(project_id: int) -> bool:
    """The project's stations' ``occurrences_count`` and ``taxa_count`` and its nights'
    ``occurrences_count`` equal counts made here against the threshold as it now stands."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(
            """
            WITH counted AS (
              SELECT o.deployment_id, o.event_id, o.determination_id
              FROM monitoring_occurrence o
              JOIN monitoring_deployment p ON p.id = o.deployment_id
              JOIN monitoring_project pr ON pr.id = p.project_id
              WHERE pr.id = %s AND o.determination_score >= pr.default_filters_score_threshold),
            st AS (SELECT deployment_id AS id, count(*) AS o,
                          count(DISTINCT determination_id) AS t
                   FROM counted GROUP BY 1),
            nt AS (SELECT event_id AS id, count(*) AS o FROM counted GROUP BY 1)
            SELECT (SELECT count(*) FROM monitoring_deployment p LEFT JOIN st ON st.id = p.id
                    WHERE p.project_id = %s AND (p.occurrences_count <> coalesce(st.o, 0)
                                                 OR p.taxa_count <> coalesce(st.t, 0)))
                 + (SELECT count(*) FROM monitoring_event e
                    JOIN monitoring_deployment p ON p.id = e.deployment_id
                    LEFT JOIN nt ON nt.id = e.id
                    WHERE p.project_id = %s AND e.occurrences_count <> coalesce(nt.o, 0))
            """,
            [project_id] * 3,
        )
        return cursor.fetchone()[0] == 0
