"""Django admin for every monitoring model.

Models with cached counts use ``counts.admin.CachedCountsAdmin``: their lists show the counts
(sortable), whether a recompute is pending and when the counts last changed, and offer
"Recompute now" to holders of ``counts.recompute_counts``. Everything else is plain.

The tables reach 10⁷ rows, so every list selects its foreign keys in the same query
(``list_select_related``) and every foreign key or M2M on a form is a raw id input: a
``<select>`` of ten million captures would never render.
"""

from django.contrib import admin

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


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "is_public", "default_filters_score_threshold", "created_at")
    list_filter = ("is_public",)
    search_fields = ("name",)
    filter_horizontal = ("members",)


@admin.register(Deployment)
class DeploymentAdmin(CachedCountsAdmin):
    list_display = ("name", "project")
    list_select_related = ("project",)
    list_filter = ("project",)
    search_fields = ("name",)
    raw_id_fields = ("project",)


@admin.register(Event)
class EventAdmin(CachedCountsAdmin):
    list_display = ("start", "end", "deployment")
    list_select_related = ("deployment",)
    raw_id_fields = ("deployment",)


@admin.register(SourceImage)
class SourceImageAdmin(CachedCountsAdmin):
    list_display = ("path", "timestamp", "deployment", "event")
    list_select_related = ("deployment", "event")
    raw_id_fields = ("deployment", "event")
    search_fields = ("path",)


@admin.register(SourceImageCollection)
class SourceImageCollectionAdmin(CachedCountsAdmin):
    list_display = ("name", "project")
    list_select_related = ("project",)
    list_filter = ("project",)
    search_fields = ("name",)
    raw_id_fields = ("project", "images")


@admin.register(Taxon)
class TaxonAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)


@admin.register(Occurrence)
class OccurrenceAdmin(admin.ModelAdmin):
    list_display = ("id", "deployment", "event", "determination", "determination_score")
    list_select_related = ("deployment", "event", "determination")
    raw_id_fields = ("deployment", "event", "determination")


@admin.register(Detection)
class DetectionAdmin(admin.ModelAdmin):
    list_display = ("id", "source_image", "occurrence", "score", "bbox")
    list_select_related = ("source_image", "occurrence")
    raw_id_fields = ("source_image", "occurrence")
