"""The capture-set list as it would be without cached counts: two bench-only DRF views.

Both subclass the production :class:`~project.monitoring.api.views.CollectionList` and change
only where the five counts come from (the three image counts, and the counted occurrences and
their taxa that Antenna's capture-set list also annotates), so pagination, filters, ordering,
the freshness probe, the serializer's shape and the middleware stack are the same code on all
three paths. What the bench compares is then exactly the cost of computing counts per request:

- :class:`SubqueryCollectionList` — three correlated ``Subquery(Count(...))`` per row over the
  membership table (joined to detections for two of them), as in the pull request this project
  grew from;
- :class:`CountDistinctCollectionList` — ``Count("images", distinct=True, filter=...)``
  annotations, the original ``with_source_images_*_count()`` queryset methods.

They are mounted only by :mod:`bench.urls`, which the bench installs as ``ROOT_URLCONF`` while
it measures; production URLs never see them.
"""

from __future__ import annotations

from django.db.models import Count, F, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from rest_framework import serializers
from rest_framework.generics import GenericAPIView

from counts.run.marks import flag_pending
from project.monitoring.api.serializers import CollectionSerializer
from project.monitoring.api.views import CollectionList
from project.monitoring.models import SourceImageCollection

Through = SourceImageCollection.images.through

#: Annotation names (a model field's own name cannot be reused for an annotation).
IMAGES, WITH_DETECTIONS, PROCESSED = "bench_images", "bench_with_detections", "bench_processed"
OCCURRENCES, TAXA = "bench_occurrences", "bench_taxa"
#: An occurrence on the set's captures counts when its score reaches its own project's threshold
#: (Antenna's ``with_occurrences_count`` / ``with_taxa_count`` of a capture set).
_OCC = "images__detections__occurrence"
_COUNTED = Q(
    **{
        f"{_OCC}__determination_score__gte": F(
            f"{_OCC}__deployment__project__default_filters_score_threshold"
        )
    }
)


def _members(condition: Q | None) -> Coalesce:
    """Memberships of the outer set (meeting ``condition``), counted by a correlated subquery."""
    members = Through.objects.filter(sourceimagecollection_id=OuterRef("pk"))
    if condition is not None:
        members = members.filter(condition)
    counted = (
        members.order_by()
        .values("sourceimagecollection_id")
        .annotate(n=Count("sourceimage_id", distinct=True))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _occurrences(column: str) -> Coalesce:
    """Distinct ``column`` of the counted occurrences on the outer set's captures, counted by a
    correlated subquery."""
    members = Through.objects.filter(
        sourceimagecollection_id=OuterRef("pk"),
        sourceimage__detections__occurrence__determination_score__gte=F(
            "sourceimage__detections__occurrence__deployment__project__default_filters_score_threshold"
        ),
    )
    counted = (
        members.order_by()
        .values("sourceimagecollection_id")
        .annotate(n=Count(f"sourceimage__detections__occurrence__{column}", distinct=True))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def subquery_annotations() -> dict:
    return {
        IMAGES: _members(None),
        WITH_DETECTIONS: _members(Q(sourceimage__detections__bbox__isnull=False)),
        PROCESSED: _members(Q(sourceimage__detections__isnull=False)),
        OCCURRENCES: _occurrences("id"),
        TAXA: _occurrences("determination"),
    }


def count_distinct_annotations() -> dict:
    return {
        IMAGES: Count("images", distinct=True),
        WITH_DETECTIONS: Count(
            "images", distinct=True, filter=Q(images__detections__bbox__isnull=False)
        ),
        PROCESSED: Count("images", distinct=True, filter=Q(images__detections__isnull=False)),
        OCCURRENCES: Count(_OCC, distinct=True, filter=_COUNTED),
        TAXA: Count(f"{_OCC}__determination", distinct=True, filter=_COUNTED),
    }


class AnnotatedCollectionSerializer(CollectionSerializer):
    """The production serializer, reading the three counts from annotations."""

    source_images_count = serializers.IntegerField(source=IMAGES, read_only=True)
    source_images_with_detections_count = serializers.IntegerField(
        source=WITH_DETECTIONS, read_only=True
    )
    source_images_processed_count = serializers.IntegerField(source=PROCESSED, read_only=True)
    occurrences_count = serializers.IntegerField(source=OCCURRENCES, read_only=True)
    taxa_count = serializers.IntegerField(source=TAXA, read_only=True)

    class Meta(CollectionSerializer.Meta):
        pass


class SubqueryCollectionList(CollectionList):
    serializer_class = AnnotatedCollectionSerializer

    def get_queryset(self):
        return SourceImageCollection.objects.annotate(**subquery_annotations())


class CountDistinctCollectionList(CollectionList):
    serializer_class = AnnotatedCollectionSerializer

    def get_queryset(self):
        return SourceImageCollection.objects.annotate(**count_distinct_annotations())


class StoredCollectionList(CollectionList):
    """The production list as it read counts before exact reads: each row's stored columns and
    its pending flag (``counts.run.marks.flag_pending``), one query per page. The exact-read
    section (``bench.exact``) measures the production list against it."""

    def paginate_queryset(self, queryset):
        page = GenericAPIView.paginate_queryset(self, queryset)
        flag_pending(page or [])
        return page
