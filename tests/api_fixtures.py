"""Data and an independent truth for the surface tests (API, admin, browser).

The dataset is small but uneven on purpose: capture sets, stations and nights get different
counts (and some ties, to exercise the id tie-break), two projects have different thresholds,
and null-marker detections make "processed" differ from "with detections".

The truth is hand-written SQL over the base tables, following DESIGN.md §1 — not the engine's
ORM-compiled aggregate, which could agree with itself when wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from django.db import connection

import counts
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    Occurrence,
    Project,
    SourceImage,
    SourceImageCollection,
    Taxon,
)

#: Dusk of the first night; every timestamp in the dataset is relative to it.
T0 = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)

#: An occurrence ``o`` whose score reaches the threshold of its own deployment's project.
_COUNTED = (
    "o.determination_score >= (SELECT p.default_filters_score_threshold"
    " FROM monitoring_deployment od JOIN monitoring_project p ON p.id = od.project_id"
    " WHERE od.id = o.deployment_id)"
)

#: ``{db table: {count column: scalar subquery correlated with t}}``.
TRUTH_SQL: dict[str, dict[str, str]] = {
    "monitoring_sourceimagecollection": {
        "source_images_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images ci"
            " WHERE ci.sourceimagecollection_id = t.id"
        ),
        "source_images_with_detections_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images ci"
            " WHERE ci.sourceimagecollection_id = t.id AND EXISTS (SELECT 1 FROM"
            " monitoring_detection d WHERE d.source_image_id = ci.sourceimage_id"
            " AND d.bbox IS NOT NULL)"
        ),
        "source_images_processed_count": (
            "SELECT count(*) FROM monitoring_sourceimagecollection_images ci"
            " WHERE ci.sourceimagecollection_id = t.id AND EXISTS (SELECT 1 FROM"
            " monitoring_detection d WHERE d.source_image_id = ci.sourceimage_id)"
        ),
    },
    "monitoring_deployment": {
        "events_count": "SELECT count(*) FROM monitoring_event e WHERE e.deployment_id = t.id",
        "occurrences_count": (
            f"SELECT count(*) FROM monitoring_occurrence o WHERE o.deployment_id = t.id"
            f" AND {_COUNTED}"
        ),
        "captures_count": (
            "SELECT count(*) FROM monitoring_sourceimage s WHERE s.deployment_id = t.id"
        ),
        "detections_count": (
            "SELECT count(*) FROM monitoring_detection d JOIN monitoring_sourceimage s"
            " ON s.id = d.source_image_id WHERE s.deployment_id = t.id AND d.bbox IS NOT NULL"
        ),
        "taxa_count": (
            f"SELECT count(DISTINCT o.determination_id) FROM monitoring_occurrence o"
            f" WHERE o.deployment_id = t.id AND o.determination_id IS NOT NULL AND {_COUNTED}"
        ),
    },
    "monitoring_event": {
        "captures_count": "SELECT count(*) FROM monitoring_sourceimage s WHERE s.event_id = t.id",
        "detections_count": (
            "SELECT count(*) FROM monitoring_detection d JOIN monitoring_sourceimage s"
            " ON s.id = d.source_image_id WHERE s.event_id = t.id AND d.bbox IS NOT NULL"
        ),
        "occurrences_count": (
            f"SELECT count(*) FROM monitoring_occurrence o WHERE o.event_id = t.id AND {_COUNTED}"
        ),
    },
}


def truth(model) -> dict[int, dict[str, int]]:
    """``{id: {count field: true value}}`` for every row of ``model``, from raw SQL."""
    columns = TRUTH_SQL[model._meta.db_table]
    select = ", ".join(f"({sql}) AS {name}" for name, sql in columns.items())
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT t.id, {select} FROM {model._meta.db_table} t ORDER BY t.id")
        return {row[0]: dict(zip(columns, row[1:], strict=True)) for row in cursor.fetchall()}


def clear_marks() -> None:
    """Empty the mark queue (a transactional test's TRUNCATE flush leaves "every row" marks)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM counts_dirtymark")


def drain_all() -> None:
    """Drain until the queue is empty, as the workers would."""
    for _ in range(1000):
        if counts.drain().empty:
            return
    raise AssertionError("the mark queue did not empty after 1000 drains")


def build_catalogue() -> SimpleNamespace:
    """Create the dataset, drain it, and return its rows by name.

    Capture sets (project Vermont unless noted), by image membership:

    ========  ======  ================  =========
    set       images  with detections   processed
    ========  ======  ================  =========
    Alpha     6       2                 3
    Bravo     2       1                 2
    Charlie   0       0                 0
    Delta     2       1                 1          (project Panama)
    Echo      1       1                 1
    ========  ======  ================  =========
    """
    clear_marks()
    c = SimpleNamespace()
    c.vermont = Project.objects.create(name="Vermont", default_filters_score_threshold=0.5)
    c.panama = Project.objects.create(name="Panama", default_filters_score_threshold=0.3)
    c.empty_project = Project.objects.create(name="Empty")
    c.north = Deployment.objects.create(project=c.vermont, name="North")
    c.south = Deployment.objects.create(project=c.vermont, name="South")
    c.canal = Deployment.objects.create(project=c.panama, name="Canal")
    c.night1 = Event.objects.create(deployment=c.north, start=T0)
    c.night2 = Event.objects.create(deployment=c.north, start=T0 + timedelta(days=1))
    c.night3 = Event.objects.create(deployment=c.south, start=T0 + timedelta(days=2))
    c.night4 = Event.objects.create(deployment=c.canal, start=T0 + timedelta(days=3))

    def image(deployment, event, n):
        return SourceImage.objects.create(
            deployment=deployment, event=event, timestamp=T0 + timedelta(minutes=n), path=f"{n}.jpg"
        )

    north = [image(c.north, c.night1 if n < 4 else c.night2, n) for n in range(6)]
    south = [image(c.south, c.night3 if n else None, 10 + n) for n in range(2)]
    canal = [image(c.canal, c.night4, 20 + n) for n in range(2)]
    box = {"x": 1, "y": 2, "w": 3, "h": 4}
    # north[0]: two valid + a marker; north[1]: marker only; north[2], south[0], canal[0]: one
    # valid each; the rest: never processed.
    for img, bbox in [
        (north[0], box),
        (north[0], box),
        (north[0], None),
        (north[1], None),
        (north[2], box),
        (south[0], box),
        (south[1], None),
        (canal[0], box),
    ]:
        Detection.objects.create(source_image=img, bbox=bbox, score=0.9)

    moth, beetle = Taxon.objects.create(name="Moth"), Taxon.objects.create(name="Beetle")
    for deployment, event, taxon, score in [
        (c.north, c.night1, moth, 0.9),
        (c.north, c.night1, beetle, 0.6),
        (c.north, c.night2, moth, 0.4),  # under Vermont's 0.5: not counted
        (c.north, None, None, 0.95),  # counted, no taxon
        (c.south, c.night3, beetle, None),  # no score: not counted
        (c.canal, c.night4, moth, 0.4),  # over Panama's 0.3: counted
    ]:
        Occurrence.objects.create(
            deployment=deployment, event=event, determination=taxon, determination_score=score
        )

    sets = {
        "Alpha": (c.vermont, north),
        "Bravo": (c.vermont, north[:2]),
        "Charlie": (c.vermont, []),
        "Delta": (c.panama, canal),
        "Echo": (c.vermont, south[:1]),
    }
    c.sets = {}
    for name, (project, images) in sets.items():
        collection = SourceImageCollection.objects.create(project=project, name=name)
        collection.images.set(images)
        c.sets[name] = collection
    drain_all()
    return c


def drift(row, **wrong: int) -> None:
    """Overwrite cached columns with wrong values, as a restore or a hand edit would.

    Writing a count column is not a change the counts depend on, so no mark is written and
    nothing but a recompute (or reconcile) will correct it.
    """
    type(row).objects.filter(pk=row.pk).update(**wrong)
