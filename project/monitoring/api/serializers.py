"""What the list endpoints return: ids, names, cached counts and their freshness.

Counts are read from their columns, never aggregated per request. Freshness tells a client how
far to trust them: ``counts_pending`` is true while a change that may alter this row's counts
waits for a worker, and ``counts_updated_at`` is when the engine last changed them (null if
never). ``counts_pending`` is set on each instance by the view, one query per page.
"""

from __future__ import annotations

from rest_framework import serializers

from counts.fields import FRESHNESS_FIELD, cached_count_fields
from project.monitoring.models import Deployment, Event, SourceImageCollection


def counted_fields(model, *leading: str) -> tuple[str, ...]:
    """``leading`` fields, then every cached count of ``model`` in declaration order, then
    freshness — so a count added to a model appears in its endpoint without editing this file."""
    counts = tuple(f.name for f in cached_count_fields(model))
    return (*leading, *counts, "counts_pending", FRESHNESS_FIELD)


class CountedSerializer(serializers.ModelSerializer):
    """Base for models with cached counts: adds the per-page ``counts_pending`` flag."""

    counts_pending = serializers.BooleanField(
        read_only=True,
        help_text="A change that may alter these counts is waiting to be recomputed.",
    )


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
