"""What the list endpoints return: ids, names, cached counts and their freshness.

The counts, ``counts_pending`` and ``counts_updated_at`` come from the engine's DRF support
(:mod:`counts.rest`); this module only picks each model's leading fields.
"""

from __future__ import annotations

from counts.rest import CountedSerializer, counted_fields
from project.monitoring.models import Deployment, Event, SourceImageCollection


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
