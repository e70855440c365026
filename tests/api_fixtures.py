"""Data for the surface tests (API, admin, browser).

The dataset is small but uneven on purpose: capture sets, stations and nights get different
counts (and some ties, to exercise the id tie-break), two projects have different thresholds,
and null-marker detections make "processed" differ from "with detections".

Counts are checked against the one independent truth, :mod:`tests.truth`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from django.contrib.auth.models import User
from django.db import connection
from rest_framework.authtoken.models import Token

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
from tests.truth import drain_all, triggers_off

#: Dusk of the first night; every timestamp in the dataset is relative to it.
T0 = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)


def clear_marks() -> None:
    """Empty the mark queue (a transactional test's TRUNCATE flush leaves "every row" marks)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM counts_dirtymark")


def build_catalogue() -> SimpleNamespace:
    """Create the dataset, drain it, and return its rows by name.

    Capture sets (project Vermont unless noted), by image membership:

    ========  ======  ================  =========  ===========  ====
    set       images  with detections   processed  occurrences  taxa
    ========  ======  ================  =========  ===========  ====
    Alpha     6       2                 3          2            2
    Bravo     2       1                 2          1            1
    Charlie   0       0                 0          0            0
    Delta     2       1                 1          1            1     (project Panama)
    Echo      1       1                 1          0            0
    ========  ======  ================  =========  ===========  ====

    Taxa with counted occurrences: Vermont: Moth 1, Beetle 1 (and one counted occurrence with
    no taxon); Panama: Moth 1; Empty: none.
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
    moth, beetle = Taxon.objects.create(name="Moth"), Taxon.objects.create(name="Beetle")
    c.moth, c.beetle = moth, beetle
    occurrences = [
        Occurrence.objects.create(
            deployment=deployment, event=event, determination=taxon, determination_score=score
        )
        for deployment, event, taxon, score in [
            (c.north, c.night1, moth, 0.9),
            (c.north, c.night1, beetle, 0.6),
            (c.north, c.night2, moth, 0.4),  # under Vermont's 0.5: not counted
            (c.north, None, None, 0.95),  # counted, no taxon
            (c.south, c.night3, beetle, None),  # no score: not counted
            (c.canal, c.night4, moth, 0.4),  # over Panama's 0.3: counted
        ]
    ]
    box = {"x": 1, "y": 2, "w": 3, "h": 4}
    # north[0]: two valid + a marker; north[1]: marker only; north[2], south[0], canal[0]: one
    # valid each; the rest: never processed. Detections of counted occurrences: on north[0]
    # (the moth) and north[2] (the beetle), in Alpha; on canal[0] (Panama's moth), in Delta.
    for img, bbox, occurrence in [
        (north[0], box, occurrences[0]),
        (north[0], box, occurrences[2]),  # the uncounted moth
        (north[0], None, None),
        (north[1], None, None),
        (north[2], box, occurrences[1]),
        (south[0], box, occurrences[4]),  # not counted
        (south[1], None, None),
        (canal[0], box, occurrences[5]),
    ]:
        Detection.objects.create(source_image=img, bbox=bbox, score=0.9, occurrence=occurrence)

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


def member(username: str, *projects: Project, password: str | None = None) -> User:
    """A user who belongs to ``projects`` (and may read their rows through the API)."""
    user = User.objects.create_user(username, password=password)
    user.projects.add(*projects)
    return user


def token_header(user: User) -> dict[str, str]:
    """Test-client headers authenticating as ``user`` with an API token."""
    token, _ = Token.objects.get_or_create(user=user)
    return {"HTTP_AUTHORIZATION": f"Token {token.key}"}


def drift(row, **wrong: int) -> None:
    """Overwrite cached columns with wrong values, as a restore with triggers off would.

    Only a write that skips the guard triggers can do it; no mark is written, and nothing but a
    recompute (or reconcile) will correct it.
    """
    with triggers_off():
        type(row).objects.filter(pk=row.pk).update(**wrong)
