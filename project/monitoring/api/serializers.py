"""What the endpoints return: ids, names, cached counts and their freshness; projects.

The counts, ``counts_pending`` and ``counts_updated_at`` come from the engine's DRF support
(:mod:`counts.surfaces.rest`); this module only picks each model's leading fields. Lists and
details of a model share one serializer, so a row has the same fields in both.
"""

from __future__ import annotations

from rest_framework import serializers

from counts.surfaces.rest import CountedSerializer, counted_fields
from project.monitoring.models import Deployment, Event, Project, SourceImageCollection


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
