"""Django admin for every monitoring model.

Models with cached counts use ``counts.admin.CachedCountsAdmin``: their lists show the counts
(sortable), whether a recompute is pending and when the counts last changed, and offer
"Recompute now" to holders of ``counts.recompute_counts``. Everything else is plain.

The tables reach 10⁷ rows, so nothing here loads a relation whole:

- every list selects its foreign keys in the same query (``list_select_related``), and every
  foreign key on a form is a raw id input (a ``<select>`` of ten million captures would never
  render);
- a capture set's members are not a form field (9,931 ids in one text input at 10⁴, 900k at
  scale): its page shows how many, the first few, and a link to the capture list filtered to
  the set, paginated there;
- deleting something with a large cascade (a project: every station, night, capture,
  detection and set membership) confirms with counts per model, one ``COUNT`` query each,
  instead of Django's page listing every object (7 MB and 10.7 s at 20k captures);
- nights and captures are filtered by project and station from the small tables (projects,
  stations), never by a ``DISTINCT`` over the rows listed, and by date through the date
  hierarchy; a night reads "North · 2024-06-01", its station selected in the list's query.
"""

from functools import reduce
from operator import or_

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db.models import CASCADE, PROTECT, RESTRICT, Model, Q, QuerySet
from django.db.models.deletion import get_candidate_relations_to_delete
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import capfirst

from counts.admin import CachedCountsAdmin
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    Occurrence,
    Project,
    SourceImage,
    SourceImageCollection,
    Taxon,
)

#: Deeper relation chains than this are not followed when counting a cascade (ours are 4 deep).
MAX_CASCADE_DEPTH = 8


class CascadeProtected(Exception):
    """A PROTECT or RESTRICT relation holds rows: Django's own page must explain which."""


def cascade_counts(queryset: QuerySet) -> dict[type[Model], int]:
    """Rows a delete of ``queryset`` would remove, per model (itself included), counted in
    PostgreSQL without loading a row: one ``COUNT`` per model over the union of the nested
    subqueries that reach it (a set membership reached from both its image and its set is
    counted once).

    Follows what ``Collector`` follows: reverse foreign keys, one-to-ones and auto-created M2M
    through rows; only CASCADE relations delete (SET_NULL and the like keep the rows).

    Raises:
        CascadeProtected: a PROTECT or RESTRICT relation would refuse the delete.
    """
    reached: dict[type[Model], list[QuerySet]] = {queryset.model: [queryset.values("pk")]}

    def walk(model: type[Model], rows: QuerySet, depth: int) -> None:
        for relation in get_candidate_relations_to_delete(model._meta):
            on_delete = relation.field.remote_field.on_delete
            related = relation.related_model._base_manager.filter(
                **{f"{relation.field.name}__in": rows}
            )
            if on_delete in (PROTECT, RESTRICT):
                if related.exists():
                    raise CascadeProtected(relation.related_model)
            elif on_delete is CASCADE and depth < MAX_CASCADE_DEPTH:
                reached.setdefault(relation.related_model, []).append(related.values("pk"))
                walk(relation.related_model, related.values("pk"), depth + 1)

    walk(queryset.model, queryset.values("pk"), 0)
    totals = {}
    for model, subqueries in reached.items():
        found = model._base_manager.filter(reduce(or_, (Q(pk__in=s) for s in subqueries)))
        totals[model] = found.count()
    return {model: n for model, n in totals.items() if n}


class SummarisedDeleteMixin:
    """Delete confirmation by counts per model once the cascade exceeds
    ``delete_summary_above`` rows; smaller deletes keep Django's full list."""

    #: Past this many rows in a cascade, the confirmation page counts instead of listing.
    delete_summary_above = 200

    def get_deleted_objects(self, objs, request):
        rows = (
            objs
            if isinstance(objs, QuerySet)
            else self.model._base_manager.filter(pk__in=[obj.pk for obj in objs])
        )
        try:
            totals = cascade_counts(rows)
        except CascadeProtected:
            totals = None
        if totals is None or sum(totals.values()) <= self.delete_summary_above:
            return super().get_deleted_objects(objs, request)
        related = self.list_select_related  # what ``str()`` of a row reads (a night's station)
        if isinstance(related, (list, tuple)):
            rows = rows.select_related(*related)
        return self._summary(list(rows[:20]), totals, request)

    def _summary(self, shown: list[Model], totals: dict, request):
        """What ``get_deleted_objects`` returns: (to_delete, model_count, perms_needed,
        protected), with the selected objects and one line for everything under them."""
        opts = self.model._meta
        to_delete = [
            format_html(
                '{}: <a href="{}">{}</a>',
                capfirst(opts.verbose_name),
                reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]),
                obj,
            )
            for obj in shown
        ]
        related = sum(totals.values()) - totals.get(self.model, 0)
        to_delete.append(
            f"… and {related:,} related objects, counted per model under “Summary” (too many"
            f" to list one by one)."
        )
        model_count = {model._meta.verbose_name_plural: f"{n:,}" for model, n in totals.items()}
        perms_needed = set()
        for model in totals:
            model_admin = self.admin_site._registry.get(model)
            if model_admin is not None and not model_admin.has_delete_permission(request):
                perms_needed.add(model._meta.verbose_name)
        return to_delete, model_count, perms_needed, []


#: The project filter's parameter on nights and captures (Django's filter of that relation).
PROJECT_PARAMETER = "deployment__project__id__exact"
#: The capture list's parameter for a capture set's members (linked from the set's page).
SET_PARAMETER = "collections__id__exact"


class StationFilter(admin.SimpleListFilter):
    """Filter by station, offered from the stations table: those of the project chosen in the
    project filter, else every station with its project's name (names repeat across projects).

    Not Django's related filters: ``RelatedOnlyFieldListFilter`` finds its choices with a
    ``DISTINCT`` over the rows listed (10⁷ captures) on every page view.
    """

    title = "station"
    parameter_name = "station"

    def lookups(self, request, model_admin):
        stations = Deployment.objects.order_by("name", "id")
        project = request.GET.get(PROJECT_PARAMETER, "")
        if project.isdigit():
            return list(stations.filter(project_id=project).values_list("pk", "name"))
        return [
            (pk, f"{name} ({project_name})")
            for pk, name, project_name in stations.values_list("pk", "name", "project__name")
        ]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        if not self.value().isdigit():
            raise IncorrectLookupParameters(f"station={self.value()!r}")
        return queryset.filter(deployment_id=self.value())


@admin.register(Project)
class ProjectAdmin(SummarisedDeleteMixin, CachedCountsAdmin):
    list_display = ("name", "is_public", "default_filters_score_threshold", "created_at")
    list_filter = ("is_public",)
    search_fields = ("name",)
    filter_horizontal = ("members",)


@admin.register(Deployment)
class DeploymentAdmin(SummarisedDeleteMixin, CachedCountsAdmin):
    list_display = ("name", "project")
    list_select_related = ("project",)
    list_filter = ("project",)
    search_fields = ("name",)
    raw_id_fields = ("project",)


@admin.register(Event)
class EventAdmin(SummarisedDeleteMixin, CachedCountsAdmin):
    list_display = ("start", "end", "deployment")
    list_select_related = ("deployment",)
    list_filter = ("deployment__project", StationFilter)
    date_hierarchy = "start"
    search_fields = ("deployment__name",)
    search_help_text = "Station name"
    raw_id_fields = ("deployment",)


@admin.register(SourceImage)
class SourceImageAdmin(SummarisedDeleteMixin, CachedCountsAdmin):
    list_display = ("path", "timestamp", "deployment", "event")
    list_select_related = ("deployment", "event", "event__deployment")
    list_filter = ("deployment__project", StationFilter)
    date_hierarchy = "timestamp"
    #: Per-choice counts ("Show counts") would be a COUNT over 10⁷ captures for every station.
    show_facets = admin.ShowFacets.NEVER
    raw_id_fields = ("deployment", "event")
    search_fields = ("path",)

    def lookup_allowed(self, lookup, value, request=None):
        """Allow ``?collections__id__exact=<set>``: a capture set's paginated member list."""
        return lookup == SET_PARAMETER or super().lookup_allowed(lookup, value, request)

    def changelist_view(self, request, extra_context=None):
        """Filtered to a capture set, the page says which: "Captures in capture set “Alpha”"
        (the filter is a link from the set's page, not one of the sidebar's)."""
        set_id = request.GET.get(SET_PARAMETER, "")
        name = None
        if set_id.isdigit():
            found = SourceImageCollection.objects.filter(pk=set_id).values_list("name", flat=True)
            name = found.first()
        if name is not None:
            extra_context = {**(extra_context or {}), "title": f"Captures in capture set “{name}”"}
        return super().changelist_view(request, extra_context)


@admin.register(SourceImageCollection)
class SourceImageCollectionAdmin(SummarisedDeleteMixin, CachedCountsAdmin):
    list_display = ("name", "project")
    list_select_related = ("project",)
    list_filter = ("project",)
    search_fields = ("name",)
    raw_id_fields = ("project",)
    exclude = ("images",)  # shown read-only by ``members``, never loaded whole
    readonly_fields = ("members",)
    #: Stable short headers, whatever other counts a set gains later.
    count_headers = {
        "source_images_count": "images",
        "source_images_with_detections_count": "with detections",
        "source_images_processed_count": "processed",
        "occurrences_count": "occurrences",
        "taxa_count": "taxa",
    }
    #: Members shown on the set's page; the rest are a click away, paginated.
    members_preview = 20

    @admin.display(description="captures")
    def members(self, obj: SourceImageCollection) -> str:
        """How many captures the set holds, the first few, and a link to all of them in the
        capture list (paginated there). Reads one ``LIMIT`` page of the membership."""
        if obj.pk is None:
            return "Add captures to a saved set."
        listing = reverse("admin:monitoring_sourceimage_changelist")
        first = obj.images.order_by("pk").values_list("pk", "path")[: self.members_preview]
        links = format_html_join(
            ", ",
            '<a href="{}">{}</a>',
            (
                (reverse("admin:monitoring_sourceimage_change", args=[pk]), path)
                for pk, path in first
            ),
        )
        return format_html(
            '<a href="{}?collections__id__exact={}">All {} captures</a> (cached count) — the'
            " first by id: {}",
            listing,
            obj.pk,
            f"{obj.source_images_count:,}",
            links or "none",
        )


@admin.register(Taxon)
class TaxonAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)


@admin.register(Occurrence)
class OccurrenceAdmin(SummarisedDeleteMixin, admin.ModelAdmin):
    list_display = ("id", "deployment", "event", "determination", "determination_score")
    list_select_related = ("deployment", "event", "event__deployment", "determination")
    raw_id_fields = ("deployment", "event", "determination")


@admin.register(Detection)
class DetectionAdmin(admin.ModelAdmin):
    list_display = ("id", "source_image", "occurrence", "score", "bbox")
    list_select_related = ("source_image", "occurrence")
    raw_id_fields = ("source_image", "occurrence")
