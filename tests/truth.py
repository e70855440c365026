"""An independent truth for the domain's twelve cached counts, and the assertion tests end with.

The engine recomputes counts with ORM ``Count`` expressions compiled from the declarations. If
the truth were computed the same way, a wrong declaration or a wrong compilation would agree
with itself. So the truth here is hand-written SQL over the base tables, one correlated
subquery per count, following DESIGN.md §1 word for word:

- a valid detection has ``bbox IS NOT NULL``;
- a counted occurrence has ``determination_score >= its project's threshold`` (its project is
  the project of the occurrence's own deployment; a NULL score never compares true);
- taxa are distinct non-NULL determinations among counted occurrences;
- a capture set counts images in it, images with a valid detection, images with any detection.
"""

from __future__ import annotations

import contextlib
import time

from django.db import connection, transaction

from counts.api import drain_until_empty, value_counts
from project.monitoring.models import Project
from tests.invariants import assert_invariants

#: Valid detections (``d``) whose image is ``si``.
_VALID_DETECTION = "d.source_image_id = si.id AND d.bbox IS NOT NULL"

#: An occurrence ``o`` whose score reaches the threshold of its own deployment's project.
_COUNTED_OCCURRENCE = """o.determination_score >= (
    SELECT p.default_filters_score_threshold FROM monitoring_deployment od
    JOIN monitoring_project p ON p.id = od.project_id WHERE od.id = o.deployment_id)"""

#: The counted occurrences ``o`` with a detection on a capture of the set ``t``.
_SET_OCCURRENCES = f"""FROM monitoring_sourceimagecollection_images m
    JOIN monitoring_detection d ON d.source_image_id = m.sourceimage_id
    JOIN monitoring_occurrence o ON o.id = d.occurrence_id
    WHERE m.sourceimagecollection_id = t.id AND {_COUNTED_OCCURRENCE}"""

#: Per table: ``{cached column: truth expression}``, each a subquery correlated with ``t``.
TRUTH: dict[str, dict[str, str]] = {
    "monitoring_project": {
        "taxa_count": (
            "SELECT count(DISTINCT o.determination_id) FROM monitoring_occurrence o"
            " JOIN monitoring_deployment od ON od.id = o.deployment_id"
            " WHERE od.project_id = t.id AND o.determination_id IS NOT NULL"
            " AND o.determination_score >= t.default_filters_score_threshold"
        ),
    },
    "monitoring_deployment": {
        "events_count": "SELECT count(*) FROM monitoring_event e WHERE e.deployment_id = t.id",
        "captures_count": (
            "SELECT count(*) FROM monitoring_sourceimage si WHERE si.deployment_id = t.id"
        ),
        "detections_count": (
            "SELECT count(*) FROM monitoring_detection d JOIN monitoring_sourceimage si"
            f" ON {_VALID_DETECTION} WHERE si.deployment_id = t.id"
        ),
        "occurrences_count": (
            "SELECT count(*) FROM monitoring_occurrence o"
            f" WHERE o.deployment_id = t.id AND {_COUNTED_OCCURRENCE}"
        ),
        "taxa_count": (
            "SELECT count(DISTINCT o.determination_id) FROM monitoring_occurrence o"
            f" WHERE o.deployment_id = t.id AND o.determination_id IS NOT NULL"
            f" AND {_COUNTED_OCCURRENCE}"
        ),
    },
    "monitoring_event": {
        "captures_count": "SELECT count(*) FROM monitoring_sourceimage si WHERE si.event_id = t.id",
        "detections_count": (
            "SELECT count(*) FROM monitoring_detection d JOIN monitoring_sourceimage si"
            f" ON {_VALID_DETECTION} WHERE si.event_id = t.id"
        ),
        "occurrences_count": (
            "SELECT count(*) FROM monitoring_occurrence o"
            f" WHERE o.event_id = t.id AND {_COUNTED_OCCURRENCE}"
        ),
        "taxa_count": (
            "SELECT count(DISTINCT o.determination_id) FROM monitoring_occurrence o"
            f" WHERE o.event_id = t.id AND o.determination_id IS NOT NULL"
            f" AND {_COUNTED_OCCURRENCE}"
        ),
    },
    "monitoring_sourceimage": {
        "detections_count": (
            "SELECT count(*) FROM monitoring_detection d"
            " WHERE d.source_image_id = t.id AND d.bbox IS NOT NULL"
        ),
    },
    "monitoring_sourceimagecollection": {
        "source_images_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images m"
            " WHERE m.sourceimagecollection_id = t.id"
        ),
        "source_images_with_detections_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images m"
            " WHERE m.sourceimagecollection_id = t.id AND EXISTS (SELECT 1"
            " FROM monitoring_detection d WHERE d.source_image_id = m.sourceimage_id"
            " AND d.bbox IS NOT NULL)"
        ),
        "source_images_processed_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images m"
            " WHERE m.sourceimagecollection_id = t.id AND EXISTS (SELECT 1"
            " FROM monitoring_detection d WHERE d.source_image_id = m.sourceimage_id)"
        ),
        # Occurrences with a detection on one of the set's captures, counted by the threshold
        # of the occurrence's own project (not the set's).
        "occurrences_count": f"SELECT count(DISTINCT o.id) {_SET_OCCURRENCES}",
        "taxa_count": (
            f"SELECT count(DISTINCT o.determination_id) {_SET_OCCURRENCES}"
            " AND o.determination_id IS NOT NULL"
        ),
    },
}

#: Model label of each table, for readable reports.
LABELS = {
    "monitoring_project": "monitoring.project",
    "monitoring_deployment": "monitoring.deployment",
    "monitoring_event": "monitoring.event",
    "monitoring_sourceimage": "monitoring.sourceimage",
    "monitoring_sourceimagecollection": "monitoring.sourceimagecollection",
}


def truth(table: str, conn=connection, truths=None) -> dict[int, dict[str, int]]:
    """``{id: {column: true value}}`` for every row of ``table``."""
    columns = (truths or TRUTH)[table]
    select = ", ".join(f"({sql}) AS {name}" for name, sql in columns.items())
    with transaction.atomic(using=conn.alias), conn.cursor() as cursor:
        # Tables a test just filled have no statistics: the estimate of these correlated
        # subqueries is then huge, and compiling them (JIT) costs half a second a call.
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(f"SELECT t.id, {select} FROM {table} t ORDER BY t.id")
        return {row[0]: dict(zip(columns, row[1:], strict=True)) for row in cursor.fetchall()}


def cached(table: str, conn=connection, truths=None) -> dict[int, dict[str, int]]:
    """``{id: {column: stored value}}`` for every row of ``table``."""
    columns = (truths or TRUTH)[table]
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT id, {', '.join(columns)} FROM {table} ORDER BY id")
        return {row[0]: dict(zip(columns, row[1:], strict=True)) for row in cursor.fetchall()}


def mismatches(conn=connection, truths=None, labels=None) -> list[str]:
    """One line per cached value that differs from the truth, e.g.
    ``monitoring.event#3 detections_count: cached 2, truth 1``.

    ``truths`` / ``labels`` default to the monitoring domain's; the engine's test app passes
    its own (``tests.engine_app.truth``).
    """
    truths, labels = truths or TRUTH, labels or LABELS
    lines = []
    for table in truths:
        want, have = truth(table, conn, truths), cached(table, conn, truths)
        for pk in sorted(want):
            for column, value in want[pk].items():
                if have[pk][column] != value:
                    lines.append(
                        f"{labels[table]}#{pk} {column}: cached {have[pk][column]}, truth {value}"
                    )
    return lines


def assert_all_counts_exact(conn=connection, truths=None, labels=None) -> None:
    """Every cached column of every row equals the truth, and (for the domain) every grouped
    count per (project, taxon); otherwise list every difference."""
    wrong = mismatches(conn, truths, labels)
    if truths is None:
        wrong += grouped_mismatches(conn)
    assert not wrong, f"{len(wrong)} cached counts differ from the truth:\n" + "\n".join(wrong)


#: Per (project, taxon): the project's counted occurrences determined as the taxon.
GROUPED_TRUTH = f"""SELECT od.project_id, o.determination_id, count(*)
    FROM monitoring_occurrence o JOIN monitoring_deployment od ON od.id = o.deployment_id
    WHERE o.determination_id IS NOT NULL AND {_COUNTED_OCCURRENCE}
    GROUP BY 1, 2"""


def grouped_mismatches(conn=connection) -> list[str]:
    """The (project, taxon) pairs whose served count (``counts.api.value_counts`` of
    ``Project.taxa_count``) differs from :data:`GROUPED_TRUTH`, a row missing on either side
    included."""
    served = {
        (r.target_id, r.value): r.n for r in value_counts(Project, "taxa_count").using(conn.alias)
    }
    with conn.cursor() as cursor:
        cursor.execute(GROUPED_TRUTH)
        truth = {(p, t): n for p, t, n in cursor.fetchall()}
    pairs = sorted(served.keys() | truth.keys())
    return [
        f"project {p} taxon {t}: occurrences_count {served.get(pair)} != truth {truth.get(pair)}"
        for pair in pairs
        if served.get(pair) != truth.get(pair)
        for p, t in [pair]
    ]


def drain_all(limit: int = 1000, patience: float = 5.0, **kwargs) -> list:
    """Call ``counts.drain()`` until it finds no mark; returns every non-empty result.

    Marks put back for later (an item or row someone held) are waited for, up to ``patience``
    seconds. ``limit`` guards against a drain that never empties the queue (itself a bug).
    """
    results, patience = [], time.monotonic() + patience
    while True:
        results += drain_until_empty(limit, **kwargs)
        # Marks put back for later (an item or row another drain held): wait until due, for a
        # few seconds (a row a test holds on purpose stays marked).
        due_in = _next_due_seconds()
        if due_in is None or time.monotonic() + due_in > patience:
            return results
        time.sleep(due_in + 0.01)


def settle(exact=None, drain=None) -> None:
    """The end of a test that wrote: drain to empty, then every cached count equals the truth
    (``exact``: another check of it, such as the engine test app's) and invariants I, J and M
    hold (``tests.invariants``), so a wrong ledger is caught before it becomes a wrong count.

    ``drain``: how to empty the queue, :func:`drain_all` by default (deferred marks waited for);
    ``tests.interleave.drain_to_empty`` makes them due at once, once every client is done."""
    (drain or drain_all)()
    (exact or assert_all_counts_exact)()
    assert_invariants()


def _next_due_seconds() -> float | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM min(not_before) - clock_timestamp())"
            " FROM counts_dirtymark WHERE not_before > clock_timestamp()"
        )
        due = cursor.fetchone()[0]
    return None if due is None else max(0.0, float(due))


@contextlib.contextmanager
def triggers_off(conn=connection):
    """A cursor whose writes skip every trigger: the column guards and the marks alike.

    This is how a restore, a bulk load or a hand repair with ``session_replication_role =
    replica`` changes a database: the drift that only a recompute or reconcile can see. Tests
    use it to make cached counts wrong on purpose; nothing else can (``counts.compile.guards``).
    """
    with transaction.atomic(using=conn.alias), conn.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        yield cursor
        # SET LOCAL lasts until the outermost transaction ends, past this savepoint: a test's
        # later writes must fire their triggers again.
        cursor.execute("SET LOCAL session_replication_role = DEFAULT")
