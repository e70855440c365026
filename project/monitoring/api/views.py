"""Read-only endpoints: the models with cached counts (DESIGN.md §4), and their projects.

Every list costs a constant number of queries whatever the page size: the count, the page, and
one ``pending_ids`` probe of the dirty-mark queue for the whole page (plus one access check
when the request names a project or station); a detail costs the row and the same probe. Rows
are scoped to the projects the caller may read (``access``): a token (``Authorization: Token
…``) or session identifies the user, and anonymous clients read public projects. Every query
parameter is checked before the first query: unknown, repeated or invalid ones are answered
with 400 naming them (``base``).
"""

from __future__ import annotations

import django_filters
from rest_framework.generics import RetrieveAPIView

from counts.api import value_counts
from counts.surfaces.rest import CountedDetailView, CountedListView, SortFilter, counted_filterset
from project.monitoring.api import access
from project.monitoring.api.base import (
    ScopedDetailView,
    ScopedListView,
    documented_detail,
    documented_list,
)
from project.monitoring.api.filters import (
    IdFilter,
    ProjectTaxaFilter,
    SearchFilter,
    WithCountsFilter,
)
from project.monitoring.api.serializers import (
    CollectionSerializer,
    DeploymentSerializer,
    EventSerializer,
    ProjectSerializer,
    TaxonSerializer,
)
from project.monitoring.models import Deployment, Event, Project, SourceImageCollection, Taxon

_FRESHNESS_NOTE = (
    " Counts are exact once `counts_pending` is false; `counts_updated_at` is when they last"
    " changed. Bad parameters are answered with 400 and the parameter's name."
)


class CountedScopedListView(ScopedListView, CountedListView):
    """A scoped, strict list (``base``) of a model with cached counts (``counts.surfaces.rest``)."""


def _project_id(path: str = "project_id") -> IdFilter:
    return IdFilter(field_name=path, require=access.require_project)


@documented_list(
    "Capture sets with their image counts",
    CollectionSerializer,
    "Capture sets with the number of images, of images with a detection (a bbox) and of"
    " processed images (any detection, including null markers)." + _FRESHNESS_NOTE,
)
class CollectionList(CountedScopedListView):
    queryset = SourceImageCollection.objects.all()
    serializer_class = CollectionSerializer
    filterset_class = counted_filterset(
        SourceImageCollection,
        {"name": "name", "created": "created_at"},
        "name",
        project_id=_project_id(),
        search=SearchFilter(fields=("name",)),
        with_counts=WithCountsFilter(),
    )


@documented_detail(
    "One capture set with its image counts",
    CollectionSerializer,
    "A capture set, as in the list." + _FRESHNESS_NOTE,
)
class CollectionDetail(ScopedDetailView, CountedDetailView):
    queryset = SourceImageCollection.objects.all()
    serializer_class = CollectionSerializer
    noun = "capture set"


@documented_list(
    "Stations (deployments) with their counts",
    DeploymentSerializer,
    "Stations with their nights, captures, detections, counted occurrences (score at or above"
    " the project's threshold) and distinct taxa among them." + _FRESHNESS_NOTE,
)
class DeploymentList(CountedScopedListView):
    queryset = Deployment.objects.all()
    serializer_class = DeploymentSerializer
    filterset_class = counted_filterset(
        Deployment,
        {"name": "name", "created": "created_at"},
        "name",
        project_id=_project_id(),
        search=SearchFilter(fields=("name",)),
    )


@documented_detail(
    "One station (deployment) with its counts",
    DeploymentSerializer,
    "A station, as in the list." + _FRESHNESS_NOTE,
)
class DeploymentDetail(ScopedDetailView, CountedDetailView):
    queryset = Deployment.objects.all()
    serializer_class = DeploymentSerializer
    noun = "deployment"


@documented_list(
    "Nights (events) with their counts",
    EventSerializer,
    "Nights with their captures, detections and counted occurrences; `search` matches the"
    " station's name." + _FRESHNESS_NOTE,
)
class EventList(CountedScopedListView):
    queryset = Event.objects.all()
    serializer_class = EventSerializer
    project_path = "deployment__project"
    filterset_class = counted_filterset(
        Event,
        {"start": "start", "created": "created_at"},
        "start",
        project_id=_project_id("deployment__project_id"),
        deployment_id=IdFilter(field_name="deployment_id", require=access.require_deployment),
        search=SearchFilter(fields=("deployment__name",)),
    )


@documented_detail(
    "One night (event) with its counts",
    EventSerializer,
    "A night, as in the list." + _FRESHNESS_NOTE,
)
class EventDetail(ScopedDetailView, CountedDetailView):
    queryset = Event.objects.all()
    serializer_class = EventSerializer
    project_path = "deployment__project"
    noun = "event"


class ProjectFilter(django_filters.FilterSet):
    search = SearchFilter(fields=("name",))
    ordering = SortFilter(keys={"name": "name", "created": "created_at"}, default="name")

    class Meta:
        model = Project
        fields: list[str] = []


@documented_list(
    "Projects",
    ProjectSerializer,
    "The projects the caller may read, to resolve the `project` of other rows; a deployment's"
    " occurrences count detections scoring at least `default_filters_score_threshold`.",
    names_rows=False,
)
class ProjectList(ScopedListView):
    queryset = Project.objects.all()
    serializer_class = ProjectSerializer
    filterset_class = ProjectFilter
    project_path = "pk"


@documented_detail("One project", ProjectSerializer, "A project, as in the list.")
class ProjectDetail(ScopedDetailView, RetrieveAPIView):
    queryset = Project.objects.all()
    serializer_class = ProjectSerializer
    project_path = "pk"
    noun = "project"


class TaxonFilter(django_filters.FilterSet):
    # Declared first: it annotates ``occurrences_count``, which the ordering then reads.
    project_id = ProjectTaxaFilter(
        field_name="project_id",
        require=access.require_project,
        grouped=lambda project_id: value_counts(Project, "taxa_count").filter(target_id=project_id),
    )
    search = SearchFilter(fields=("name",))
    ordering = SortFilter(
        keys={"name": "name", "occurrences_count": "occurrences_count"}, default="name"
    )

    class Meta:
        model = Taxon
        fields: list[str] = []


@documented_list(
    "Taxa of a project with their counted occurrences",
    TaxonSerializer,
    "The taxa with at least one counted occurrence (score at or above the project's threshold)"
    " in the project `project_id` (required), each with `occurrences_count` in that project."
    " The counts are kept by the engine per (project, taxon) and are exact once the project's"
    " counts are (`counts_pending` of its stations)."
    " Bad parameters are answered with 400 and the parameter's name.",
)
class TaxonList(ScopedListView):
    queryset = Taxon.objects.all()
    serializer_class = TaxonSerializer
    filterset_class = TaxonFilter

    def get_queryset(self):
        # Taxa belong to no project: the required ``project_id`` scopes them (and refuses a
        # project the caller may not read) in ``ProjectTaxaFilter``.
        return Taxon.objects.all()
