"""The writers and drainers of ``test_concurrent_histories``: random writes, single-mark drains.

Each writer operation takes a :class:`Rows` (the writer's random source and the ids it picks
from) and makes one change, or none when the row it picked is gone; it runs inside the writer's
transaction. Operations are plain ORM or SQL, so they hold for any engine. Captures, stations,
nights, sets and projects are never deleted: every id a writer holds stays valid, and the only
errors left are the ones concurrency makes (deadlocks), which roll back with their marks.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from django.db import DatabaseError, connection, transaction

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

BOX = [10, 10, 20, 20]
T0 = datetime(2024, 7, 1, tzinfo=UTC)
SCORES = [None, 0.2, 0.35, 0.5, 0.7, 0.95]
THRESHOLDS = [0.0, 0.3, 0.5, 0.8]


class Loop(threading.Thread):
    """A thread on its own connection that keeps its first exception for the test."""

    def __init__(self, work, *args) -> None:
        super().__init__(daemon=True)
        self.work, self.args, self.error = work, args, None

    def run(self) -> None:
        try:
            self.work(*self.args)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def finish(self, timeout: float = 30) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.work.__name__} did not finish"
        if self.error:
            raise self.error


class Rows:
    """The ids a writer picks from: fixed tables read once, detections read when needed."""

    def __init__(self, rng: random.Random, operations=None) -> None:
        self.rng = rng
        self.operations = operations or OPERATIONS
        self.hot: int | None = None  # the capture the writers pick half the time, to collide
        self.images = list(SourceImage.objects.values_list("pk", flat=True))
        self.sets = list(SourceImageCollection.objects.values_list("pk", flat=True))
        self.stations = list(Deployment.objects.values_list("pk", flat=True))
        self.projects = list(Project.objects.values_list("pk", flat=True))
        self.occurrences = list(Occurrence.objects.values_list("pk", flat=True))
        self.taxa = [None, *Taxon.objects.values_list("pk", flat=True)]
        self.nights: dict[int, list[int | None]] = {d: [None] for d in self.stations}
        for pk, station in Event.objects.values_list("pk", "deployment_id"):
            self.nights[station].append(pk)

    def image(self) -> int:
        if self.hot is not None and self.rng.random() < 0.5:
            return self.hot
        return self.rng.choice(self.images)

    def set(self) -> int:
        return self.rng.choice(self.sets)

    def detection(self) -> int | None:
        return Detection.objects.order_by("?").values_list("pk", flat=True).first()

    def bbox(self):
        return self.rng.choice([BOX, BOX, None])


# Writer operations: each takes the writer's Rows and makes one change (or none, when the row
# it picked is gone). They run inside the writer's transaction.


def create_detection(r: Rows) -> None:
    Detection.objects.create(source_image_id=r.image(), bbox=r.bbox())


def bulk_create_detections(r: Rows) -> None:
    Detection.objects.bulk_create(
        [Detection(source_image_id=r.image(), bbox=r.bbox()) for _ in range(r.rng.randint(1, 3))]
    )


def delete_detection(r: Rows) -> None:
    Detection.objects.filter(pk=r.detection()).delete()


def move_detection(r: Rows) -> None:
    Detection.objects.filter(pk=r.detection()).update(source_image_id=r.image())


def flip_detection(r: Rows) -> None:
    if (pk := r.detection()) and (detection := Detection.objects.filter(pk=pk).first()):
        detection.bbox = None if detection.bbox else BOX
        detection.save()


def queryset_update_bboxes(r: Rows) -> None:
    Detection.objects.filter(source_image__deployment=r.rng.choice(r.stations)).update(
        bbox=r.bbox()
    )


def queryset_delete_null_markers(r: Rows) -> None:
    Detection.objects.filter(source_image=r.image(), bbox__isnull=True).delete()


def move_image(r: Rows) -> None:
    station = r.rng.choice(r.stations)
    SourceImage.objects.filter(pk=r.image()).update(
        deployment_id=station, event_id=r.rng.choice(r.nights[station])
    )


def set_side(r: Rows) -> None:
    images = SourceImageCollection.objects.get(pk=r.set()).images
    if r.rng.random() < 0.6:
        images.add(r.image())
    else:
        images.remove(r.image())


def image_side(r: Rows) -> None:
    sets = SourceImage.objects.get(pk=r.image()).collections
    if r.rng.random() < 0.6:
        sets.add(r.set())
    else:
        sets.remove(r.set())


def raw_membership(r: Rows) -> None:
    with connection.cursor() as cursor:
        if r.rng.random() < 0.6:
            cursor.execute(
                "INSERT INTO monitoring_sourceimagecollection_images"
                " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                [r.set(), r.image()],
            )
        else:
            cursor.execute(
                "DELETE FROM monitoring_sourceimagecollection_images WHERE sourceimage_id = %s",
                [r.image()],
            )


def rescore_occurrence(r: Rows) -> None:
    occurrence = Occurrence.objects.get(pk=r.rng.choice(r.occurrences))
    occurrence.determination_score = r.rng.choice(SCORES)
    occurrence.determination_id = r.rng.choice(r.taxa)
    occurrence.save()


def rescore_station(r: Rows) -> None:
    Occurrence.objects.filter(deployment_id=r.rng.choice(r.stations)).update(
        determination_score=r.rng.choice(SCORES)
    )


def set_threshold(r: Rows) -> None:
    Project.objects.filter(pk=r.rng.choice(r.projects)).update(
        default_filters_score_threshold=r.rng.choice(THRESHOLDS)
    )


#: Operations with their weights: detections and memberships most, thresholds rarely.
OPERATIONS = [
    (create_detection, 6),
    (bulk_create_detections, 2),
    (delete_detection, 4),
    (move_detection, 3),
    (flip_detection, 3),
    (queryset_update_bboxes, 1),
    (queryset_delete_null_markers, 1),
    (move_image, 4),
    (set_side, 3),
    (image_side, 3),
    (raw_membership, 3),
    (rescore_occurrence, 2),
    (rescore_station, 1),
    (set_threshold, 1),
]
#: Writes that change which station, night or sets a capture belongs to.
PLACEMENT = {move_image, set_side, image_side, raw_membership}
#: Operation families of the burst test: everything, or every write but those.
FAMILIES = {
    "everything": OPERATIONS,
    "placement-fixed": [(f, w) for f, w in OPERATIONS if f not in PLACEMENT],
}


def one_transaction(rows: Rows, stats: Counter) -> None:
    """One to three operations in one transaction, sometimes held open a few milliseconds."""
    rng = rows.rng
    functions, weights = zip(*rows.operations, strict=True)
    chosen = rng.choices(functions, weights, k=rng.randint(1, 3))
    pause = rng.choice([0, 0.005, 0.02, 0.02])
    try:
        with transaction.atomic():
            for operation in chosen:
                operation(rows)
                time.sleep(pause)  # others write, commit and drain meanwhile
    except DatabaseError as exc:  # deadlock, duplicate membership: rolled back, marks too
        stats[type(exc).__name__] += 1
    else:
        stats["committed"] += 1
        stats.update(f.__name__ for f in chosen)


def drain_once(rng: random.Random, stats: Counter, recompute_now: bool) -> None:
    """One single-mark batch (and, for the drainer that does so, sometimes "Recompute now")."""
    try:
        if recompute_now and rng.random() < 0.05:
            model = rng.choice([Deployment, Event, SourceImage, SourceImageCollection])
            counts.recompute(model.objects.order_by("?")[:2])
            stats["recomputes"] += 1
        result = counts.drain(batch_size=1, max_ids=1)
    except DatabaseError as exc:  # a deadlock victim: its marks were rolled back
        stats[type(exc).__name__] += 1
        return
    stats["marks"] += result.marks
    if result.empty:
        time.sleep(0.001)


def grow_world(world) -> None:
    """Four more captures, one more set and occurrences on every station: more to collide on."""
    for k, (station, night) in enumerate(
        [(world.d1, world.e2), (world.d2, world.e3), (world.d2, None), (world.d3, None)]
    ):
        SourceImage.objects.create(
            deployment=station, event=night, timestamp=T0 + timedelta(minutes=k), path=f"x/{k}.jpg"
        )
    extra = SourceImageCollection.objects.create(project=world.p2, name="Mixed")
    extra.images.set([world.i4, world.i5, world.i3])
    for station, night in [(world.d2, world.e3), (world.d3, None), (world.d1, world.e2)]:
        Occurrence.objects.create(
            deployment=station, event=night, determination=world.moth, determination_score=0.6
        )
