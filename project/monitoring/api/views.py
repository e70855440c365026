"""Read-only list endpoints for the models with cached counts (DESIGN.md §4).

Every endpoint costs a constant number of queries whatever the page size: the count, the page,
and one ``pending_ids`` probe of the dirty-mark queue for the whole page. The API is public and
read-only, so it carries no authentication (a schema with none is also one schemathesis can
check honestly).
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny

from counts.fields import FRESHNESS_FIELD, cached_count_fields
from counts.marks import flag_pending
from project.monitoring.api.filters import IdFilters, StrictLimitOffsetPagination, StrictOrdering
from project.monitoring.api.params import BadParameterSerializer
from project.monitoring.api.serializers import (
    CollectionSerializer,
    DeploymentSerializer,
    EventSerializer,
)
from project.monitoring.models import Deployment, Event, SourceImageCollection


def count_orderings(model) -> dict[str, str]:
    """Every cached count (and freshness) is a sort key, named as its column."""
    names = [f.name for f in cached_count_fields(model)]
    return {**{name: name for name in names}, FRESHNESS_FIELD: FRESHNESS_FIELD}


class CountedListView(ListAPIView):
    """A paginated, filtered, ordered list of a model with cached counts.

    Subclasses set ``queryset``, ``serializer_class``, ``id_filters`` ({param: lookup}),
    ``ordering_fields`` ({public name: column}) and ``default_ordering``.
    """

    authentication_classes = ()
    permission_classes = (AllowAny,)
    pagination_class = StrictLimitOffsetPagination
    filter_backends = (IdFilters, StrictOrdering)
    id_filters: dict[str, str] = {}
    ordering_fields: dict[str, str] = {}
    default_ordering = "id"

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        flag_pending(page)
        return page


def _documented(summary: str, serializer, description: str):
    """Schema for a list endpoint: the paginated 200 and the 400 naming a refused parameter."""
    return extend_schema_view(
        get=extend_schema(
            summary=summary,
            description=description + _FRESHNESS_NOTE,
            responses={
                200: serializer,
                400: OpenApiResponse(
                    BadParameterSerializer,
                    description="A query parameter was refused; `parameter` names it.",
                ),
            },
        )
    )


_FRESHNESS_NOTE = (
    " Counts are exact once `counts_pending` is false; `counts_updated_at` is when they last"
    " changed. Bad parameters are answered with 400 and the parameter's name."
)


@_documented(
    "Capture sets with their image counts",
    CollectionSerializer,
    "Capture sets with the number of images, of images with a detection (a bbox) and of"
    " processed images (any detection, including null markers).",
)
class CollectionList(CountedListView):
    queryset = SourceImageCollection.objects.all()
    serializer_class = CollectionSerializer
    id_filters = {"project_id": "project_id"}
    ordering_fields = {
        "name": "name",
        "created": "created_at",
        **count_orderings(SourceImageCollection),
    }
    default_ordering = "name"


@_documented(
    "Stations (deployments) with their counts",
    DeploymentSerializer,
    "Stations with their nights, captures, detections, counted occurrences (score at or above"
    " the project's threshold) and distinct taxa among them.",
)
class DeploymentList(CountedListView):
    queryset = Deployment.objects.all()
    serializer_class = DeploymentSerializer
    id_filters = {"project_id": "project_id"}
    ordering_fields = {"name": "name", "created": "created_at", **count_orderings(Deployment)}
    default_ordering = "name"


@_documented(
    "Nights (events) with their counts",
    EventSerializer,
    "Nights with their captures, detections and counted occurrences.",
)
class EventList(CountedListView):
    queryset = Event.objects.all()
    serializer_class = EventSerializer
    id_filters = {"deployment_id": "deployment_id", "project_id": "deployment__project_id"}
    ordering_fields = {"start": "start", "created": "created_at", **count_orderings(Event)}
    default_ordering = "start"
