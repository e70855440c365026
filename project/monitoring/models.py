"""The monitoring domain: projects, stations, nights, captures, detections, occurrences, sets.

The twelve ``CachedCountField`` columns below are the product. Each one is a single declaration
of what it counts; the ``counts`` engine derives the triggers that mark rows dirty and the
aggregates that recompute them. The semantics (DESIGN.md §1) in one place:

- a *valid* detection has a bbox; a detection without one is a null marker meaning "processed,
  nothing found";
- a *counted* occurrence has ``determination_score >= project.default_filters_score_threshold``.
"""

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from counts.declare.field import CachedCountField


def _counted_occurrences(prefix: str, threshold_path: str) -> Q:
    """Occurrences whose score reaches their project's threshold, seen from ``prefix``."""
    return Q(**{f"{prefix}__determination_score__gte": F(threshold_path)})


class TimestampedModel(models.Model):
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class Project(TimestampedModel):
    """A monitoring programme; the unit of access (see ``project.monitoring.api.access``)."""

    name = models.CharField(max_length=200)
    default_filters_score_threshold = models.FloatField(default=0.5)
    is_public = models.BooleanField(
        default=False,
        db_default=False,  # rows inserted in bulk by raw SQL (seed_demo, bench) are private
        help_text="Anyone, signed in or not, may read this project's rows through the API.",
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        related_name="projects",
        blank=True,
        help_text="Users who may read this project's rows through the API.",
    )

    #: Distinct taxa among the project's counted occurrences. Its multiplicities are the
    #: grouped count per (project, taxon) the taxa list serves (``counts.api.value_counts``).
    taxa_count = CachedCountField(
        "deployments__occurrences__determination",
        distinct=True,
        filter=_counted_occurrences(
            "deployments__occurrences",
            "deployments__occurrences__deployment__project__default_filters_score_threshold",
        ),
    )

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class Deployment(TimestampedModel):
    """A camera station."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(max_length=200)

    events_count = CachedCountField("events")
    occurrences_count = CachedCountField(
        "occurrences",
        filter=_counted_occurrences("occurrences", "project__default_filters_score_threshold"),
    )
    captures_count = CachedCountField("captures")
    detections_count = CachedCountField(
        "captures__detections", filter=Q(captures__detections__bbox__isnull=False)
    )
    taxa_count = CachedCountField(
        "occurrences__determination",
        distinct=True,
        filter=_counted_occurrences("occurrences", "project__default_filters_score_threshold"),
    )

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class Event(TimestampedModel):
    """A night of captures at one station."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    start = models.DateTimeField()
    end = models.DateTimeField(null=True, blank=True)

    captures_count = CachedCountField("captures")
    detections_count = CachedCountField(
        "captures__detections", filter=Q(captures__detections__bbox__isnull=False)
    )
    occurrences_count = CachedCountField(
        "occurrences",
        filter=_counted_occurrences(
            "occurrences", "occurrences__deployment__project__default_filters_score_threshold"
        ),
    )
    taxa_count = CachedCountField(
        "occurrences__determination",
        distinct=True,
        filter=_counted_occurrences(
            "occurrences", "occurrences__deployment__project__default_filters_score_threshold"
        ),
    )

    class Meta:
        ordering = ["start", "id"]

    def __str__(self) -> str:
        """ "North · 2024-06-01": a night is known by its station's name, not its id. Reads
        ``deployment``: lists showing nights select it in the same query (the admin's
        ``list_select_related``), or this costs a query per row."""
        station = self.deployment.name if self.deployment_id is not None else "no station"
        return f"{station} · {self.start:%Y-%m-%d}"


class SourceImage(TimestampedModel):
    """A capture."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="captures")
    event = models.ForeignKey(
        Event, on_delete=models.SET_NULL, null=True, blank=True, related_name="captures"
    )
    timestamp = models.DateTimeField()
    path = models.CharField(max_length=500)

    detections_count = CachedCountField("detections", filter=Q(detections__bbox__isnull=False))

    class Meta:
        ordering = ["timestamp", "id"]
        indexes = [models.Index(fields=["deployment", "timestamp"], name="capture_station_time")]

    def __str__(self) -> str:
        return self.path


class Taxon(TimestampedModel):
    name = models.CharField(max_length=255, unique=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "taxa"

    def __str__(self) -> str:
        return self.name


class Occurrence(TimestampedModel):
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="occurrences")
    event = models.ForeignKey(
        Event, on_delete=models.SET_NULL, null=True, blank=True, related_name="occurrences"
    )
    determination = models.ForeignKey(
        Taxon, on_delete=models.SET_NULL, null=True, blank=True, related_name="occurrences"
    )
    determination_score = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # A threshold change is expanded into the occurrences it can flip by a range scan
            # per station (``counts.declare.jobs``): work in proportion to the flips.
            models.Index(
                fields=["deployment", "determination_score"], name="occurrence_station_score"
            )
        ]

    def __str__(self) -> str:
        return f"Occurrence #{self.pk}"


class Detection(TimestampedModel):
    source_image = models.ForeignKey(
        SourceImage, on_delete=models.CASCADE, related_name="detections"
    )
    bbox = models.JSONField(null=True, blank=True)
    occurrence = models.ForeignKey(
        Occurrence, on_delete=models.SET_NULL, null=True, blank=True, related_name="detections"
    )
    score = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"Detection #{self.pk}"


class SourceImageCollection(TimestampedModel):
    """A capture set: a user-chosen group of captures, often hundreds of thousands."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="collections")
    name = models.CharField(max_length=200)
    images = models.ManyToManyField(SourceImage, related_name="collections", blank=True)

    source_images_count = CachedCountField("images")
    source_images_with_detections_count = CachedCountField(
        "images", filter=Q(images__detections__bbox__isnull=False)
    )
    source_images_processed_count = CachedCountField(
        "images", filter=Q(images__detections__isnull=False)
    )
    # The threshold is the occurrence's own project's (through its station), not the set's.
    occurrences_count = CachedCountField(
        "images__detections__occurrence",
        distinct=True,
        filter=_counted_occurrences(
            "images__detections__occurrence",
            "images__detections__occurrence__deployment__project__default_filters_score_threshold",
        ),
    )
    taxa_count = CachedCountField(
        "images__detections__occurrence__determination",
        distinct=True,
        filter=_counted_occurrences(
            "images__detections__occurrence",
            "images__detections__occurrence__deployment__project__default_filters_score_threshold",
        ),
    )

    class Meta:
        ordering = ["name", "id"]
        verbose_name = "capture set"

    def __str__(self) -> str:
        return self.name
