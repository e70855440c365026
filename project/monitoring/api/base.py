"""What every endpoint of the API shares: strict parameters, project scoping, its documentation.

:class:`ScopedListView` and :class:`ScopedDetailView` are the two shapes (a page of rows, one
row); the endpoints in ``views`` only name a queryset, a serializer and their filters. Both
refuse unknown, repeated and malformed parameters with a 400 naming them before any query
runs, and both serve only rows of the projects the caller may read (``access``).

A detail that the caller may not read is answered as if it did not exist, so ids cannot be
probed: 404 for a signed-in user (where a list naming a private project says 403, a detail
says 404 — a 403 would confirm that the row exists), and 401 with ``WWW-Authenticate: Token``
for an anonymous client, as the lists answer it, whether the row is private or missing.
"""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import renderers
from rest_framework.exceptions import NotFound
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny
from rest_framework.routers import APIRootView as DRFAPIRootView
from rest_framework.settings import api_settings

from project.monitoring.api import access
from project.monitoring.api.filters import StrictFilterBackend, StrictLimitOffsetPagination
from project.monitoring.api.params import (
    MAX_ID,
    BadParameterSerializer,
    DetailSerializer,
    check_names,
    integer_schema,
    parse_bounded,
)


class BrowsableAPIRenderer(renderers.BrowsableAPIRenderer):
    """DRF's browsable API, keeping the Filters button on a refused list request.

    DRF shows the filter form only beside a page of results, so a 400 for a bad filter left
    the user without the form to correct it. Here a list endpoint always offers it, filled
    with what was sent and the error beside the field.
    """

    def get_filter_form(self, data, view, request):
        if isinstance(view, ListAPIView) and not (isinstance(data, dict) and "results" in data):
            data = []  # a refusal of a list request: render the form as for an empty page
        return super().get_filter_form(data, view, request)


#: JSON first (the default for clients that do not ask), then HTML for browsers.
RENDERERS = (renderers.JSONRenderer, BrowsableAPIRenderer)


class APIRootView(DRFAPIRootView):
    """The router's API root (links to every list), readable without signing in like the lists
    it links to."""

    permission_classes = (AllowAny,)
    renderer_classes = RENDERERS


class ScopedListView(ListAPIView):
    """A page of rows scoped to the projects the caller may read, strict about its parameters.

    Subclasses set ``queryset``, ``serializer_class``, ``filterset_class`` (its filters are the
    endpoint's parameters besides ``limit``/``offset``) and ``project_path`` (how a row reaches
    its project; ``pk`` for projects themselves).
    """

    #: Anonymous clients may list, and see public projects only (``access``); the project-wide
    #: default (settings) is authenticated.
    permission_classes = (AllowAny,)
    renderer_classes = RENDERERS
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


class ScopedDetailView:
    """One row by id (``<id>`` in the URL), scoped like the lists; mixed in before a DRF
    retrieve view. It takes no query parameter besides ``format``.

    ``noun`` names the row in refusals ("deployment 7").
    """

    permission_classes = (AllowAny,)
    renderer_classes = RENDERERS
    lookup_url_kwarg = "id"
    project_path = "project"
    noun = "row"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        check_names(request.query_params, [api_settings.URL_FORMAT_OVERRIDE])

    def get_queryset(self):
        return access.scope(super().get_queryset(), self.request.user, self.project_path)

    def get_object(self):
        """The row, or the refusal that does not tell a private row from a missing one."""
        raw = self.kwargs[self.lookup_url_kwarg]
        try:
            parse_bounded(raw, 1, MAX_ID)  # "abc" or 2**64 can be no row: 404, not a 500
        except ValueError:
            raise NotFound(f"No {self.noun} {raw!r}: ids are positive integers.") from None
        try:
            return super().get_object()
        except Http404:
            access.refuse_row(self.request.user, f"{self.noun} {raw}")


_ACCESS_NOTE = (
    " Rows come from the projects the caller is a member of and the public ones; authenticate"
    " with `Authorization: Token <key>` (POST username and password to /api/auth/token/ for a"
    " key) or a session."
)
_BAD_PARAMETER = OpenApiResponse(
    BadParameterSerializer,
    description="A query parameter was refused; `parameter` names it.",
)


def documented_list(summary: str, serializer, description: str, *, names_rows: bool = True):
    """Schema for a list endpoint: the paginated 200 and the refusals it can answer (a 403 only
    where a filter names a project or station, ``names_rows``)."""
    responses = {
        200: serializer,
        400: _BAD_PARAMETER,
        401: OpenApiResponse(
            DetailSerializer,
            description="Anonymous request for a project or station that is not public,"
            " or an invalid token."
            if names_rows
            else "An invalid token.",
        ),
    }
    if names_rows:
        responses[403] = OpenApiResponse(
            DetailSerializer, description="The signed-in user is not a member of that project."
        )
    return extend_schema_view(
        get=extend_schema(
            summary=summary, description=description + _ACCESS_NOTE, responses=responses
        )
    )


def documented_detail(summary: str, serializer, description: str):
    """Schema for a detail endpoint: the row, or a refusal that does not reveal whether a row
    the caller may not read exists (module docstring)."""
    return extend_schema_view(
        get=extend_schema(
            summary=summary,
            description=description + _ACCESS_NOTE,
            parameters=[
                OpenApiParameter(
                    "id",
                    {**integer_schema(1, MAX_ID), "type": "integer"},
                    OpenApiParameter.PATH,
                    description="The row's id, as in the list.",
                )
            ],
            responses={
                200: serializer,
                400: _BAD_PARAMETER,
                401: OpenApiResponse(
                    DetailSerializer,
                    description="Anonymous request for a row that is not public (or does not"
                    " exist), or an invalid token.",
                ),
                404: OpenApiResponse(
                    DetailSerializer,
                    description="No such row among those the caller may read.",
                ),
            },
        )
    )
