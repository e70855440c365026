"""Read-only list endpoints for the models with cached counts (DESIGN.md §4).

Every endpoint costs a constant number of queries whatever the page size: the count, the page,
and one ``pending_ids`` probe of the dirty-mark queue for the whole page (plus one access check
when the request names a project or station). Rows are scoped to the projects the caller may
read (``access``): a token (``Authorization: Token …``) or session identifies the user, and
anonymous clients read public projects. Every query parameter is checked before the first
query: unknown, repeated or invalid ones are answered with 400 naming them.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.permissions import AllowAny
from rest_framework.settings import api_settings

from counts.rest import CountedListView, counted_filterset
from project.monitoring.api import access
from project.monitoring.api.filters import (
    IdFilter,
    StrictFilterBackend,
    StrictLimitOffsetPagination,
)
from project.monitoring.api.params import (
    BadParameterSerializer,
    DetailSerializer,
    check_names,
)
from project.monitoring.api.serializers import (
    CollectionSerializer,
    DeploymentSerializer,
    EventSerializer,
)
from project.monitoring.models import Deployment, Event, SourceImageCollection


class ScopedListView(CountedListView):
    """The engine's list of a counted model (counts, freshness, ``counts_pending``), scoped to
    the projects the caller may read and strict about its parameters.

    Subclasses set ``queryset``, ``serializer_class``, ``filterset_class`` (its filters are the
    endpoint's parameters besides ``limit``/``offset``) and ``project_path`` (how a row reaches
    its project).
    """

    #: Anonymous clients may list, and see public projects only (``access``); the project-wide
    #: default (settings) is authenticated.
    permission_classes = (AllowAny,)
    pagination_class = StrictLimitOffsetPagination
    filter_backends = (StrictFilterBackend,)
    project_path = "project"

    def initial(self, request, *args, **kwargs):
        """Refuse unknown, repeated and malformed parameters before any query runs."""
        super().initial(request, *args, **kwargs)
        accepted = [
            *self.paginator.parameter_names(),
            *StrictFilterBackend().parameter_names(self),
        ]
        check_names(request.query_params, [*accepted, api_settings.URL_FORMAT_OVERRIDE])
        self.paginator.check(request)

    def get_queryset(self):
        return access.scope(super().get_queryset(), self.request.user, self.project_path)


def _project_id(path: str = "project_id") -> IdFilter:
    return IdFilter(field_name=path, require=access.require_project)


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
                401: OpenApiResponse(
                    DetailSerializer,
                    description="Anonymous request for a project or station that is not public,"
                    " or an invalid token.",
                ),
                403: OpenApiResponse(
                    DetailSerializer,
                    description="The signed-in user is not a member of that project.",
                ),
            },
        )
    )


_FRESHNESS_NOTE = (
    " Counts are exact once `counts_pending` is false; `counts_updated_at` is when they last"
    " changed. Bad parameters are answered with 400 and the parameter's name. Rows come from"
    " the projects the caller is a member of and the public ones; authenticate with"
    " `Authorization: Token <key>` (POST username and password to /api/auth/token/ for a key)"
    " or a session."
)


@_documented(
    "Capture sets with their image counts",
    CollectionSerializer,
    "Capture sets with the number of images, of images with a detection (a bbox) and of"
    " processed images (any detection, including null markers).",
)
class CollectionList(ScopedListView):
    queryset = SourceImageCollection.objects.all()
    serializer_class = CollectionSerializer
    filterset_class = counted_filterset(
        SourceImageCollection,
        {"name": "name", "created": "created_at"},
        "name",
        project_id=_project_id(),
    )


@_documented(
    "Stations (deployments) with their counts",
    DeploymentSerializer,
    "Stations with their nights, captures, detections, counted occurrences (score at or above"
    " the project's threshold) and distinct taxa among them.",
)
class DeploymentList(ScopedListView):
    queryset = Deployment.objects.all()
    serializer_class = DeploymentSerializer
    filterset_class = counted_filterset(
        Deployment,
        {"name": "name", "created": "created_at"},
        "name",
        project_id=_project_id(),
    )


@_documented(
    "Nights (events) with their counts",
    EventSerializer,
    "Nights with their captures, detections and counted occurrences.",
)
class EventList(ScopedListView):
    queryset = Event.objects.all()
    serializer_class = EventSerializer
    project_path = "deployment__project"
    filterset_class = counted_filterset(
        Event,
        {"start": "start", "created": "created_at"},
        "start",
        project_id=_project_id("deployment__project_id"),
        deployment_id=IdFilter(field_name="deployment_id", require=access.require_deployment),
    )
