"""What the endpoints return: ids, names, cached counts and their freshness; projects.

The counts, ``counts_pending`` and ``counts_updated_at`` come from the engine's DRF support
(:mod:`counts.surfaces.rest`); this module only picks each model's leading fields. Lists and
details of a model share one serializer, so a row has the same fields in both.
"""

from __future__ import annotations

from rest_framework import serializers

from counts.surfaces.rest import CountedSerializer, counted_fields
from project.monitoring.models import Deployment, Event, Project, SourceImageCollection, Taxon


class CollectionSerializer(CountedSerializer):
    """A capture set: its image counts and their freshness."""

    class Meta:
        model = SourceImageCollection
        fields = counted_fields(SourceImageCollection, "id", "name", "project")
        read_only_fields = fields


class DeploymentSerializer(CountedSerializer):
    """A station: its counts and their freshness."""

    class Meta:
        model = Deployment
        fields = counted_fields(Deployment, "id", "name", "project")
        read_only_fields = fields


class EventSerializer(CountedSerializer):
    """A night at one station: its counts and their freshness."""

    class Meta:
        model = Event
        fields = counted_fields(Event, "id", "deployment", "start", "end")
        read_only_fields = fields


class ProjectSerializer(serializers.ModelSerializer):
    """A project: what a ``project`` id in other rows refers to, and whether anyone may read it."""

    class Meta:
        model = Project
        fields = ("id", "name", "is_public", "default_filters_score_threshold")
        read_only_fields = fields


class TaxonSerializer(serializers.ModelSerializer):
    """A taxon with its counted occurrences in the project the list is for (Antenna's
    ``occurrences_count``): read from the grouped count ``Project.taxa_count`` keeps."""

    occurrences_count = serializers.IntegerField(
        read_only=True,
        help_text="Occurrences of the project determined as this taxon with a score at or above"
        " the project's threshold.",
    )

    class Meta:
        model = Taxon
        fields = ("id", "name", "occurrences_count")
        read_only_fields = fields
