"""Admin for cached counts, reusable by any app: it imports nothing from the domain.

Three pieces:

- :class:`CachedCountsMixin` (and :class:`CachedCountsAdmin`, the mixin on ``ModelAdmin``) for a
  model with ``CachedCountField``\\ s. Its list shows every count under a short header with
  thousands separators (sortable: they are plain columns) and one *freshness* column: a
  "pending" badge while a dirty mark waits for the row (one query per page, not per row), else
  "updated 12 s ago" from ``counts_updated_at``. Its **"Recompute now"** action recomputes the
  selected rows synchronously, under the same locks as a drain, and is offered only to users
  holding ``counts.recompute_counts``: staff status alone does not let anyone take row locks on
  a 900k-image capture set.
- :func:`augment`, run by ``CountsConfig.ready()``: every registered ``ModelAdmin`` whose model
  has cached counts but does not use the mixin gets it, so a count declared on a model with a
  plain admin shows up (column, freshness, "Recompute now") without touching its admin.
  Totals on its list read like its counts ("9,931 results (20,000 total)"), and a row's
  change page shows the counts, freshness and "Recompute now" too
  (``counts.surfaces.admin_change``).
- :class:`DirtyMarkAdmin`, a read-only page for operators titled "Pending recomputes": the
  backlog per model (requests, rows, age of the oldest) above the waiting requests themselves
  (template: ``counts/templates/admin/counts/dirtymark/change_list.html``). It speaks the
  operator's words (verbose names, "3 min ago"), not the engine's (marks, labels, seconds).
"""

from __future__ import annotations

import functools
from datetime import datetime

from django import forms
from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin.templatetags.admin_list import pagination, search_form
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from counts.base.names import FRESHNESS_FIELD
from counts.declare.field import cached_count_fields
from counts.models import DirtyMark
from counts.operate.recomputing import recompute
from counts.run.exact import apply_exact
from counts.run.marks import pending_summary
from counts.surfaces.admin_change import ChangePageMixin, extend_template

#: The permission that unlocks "Recompute now" (declared on ``DirtyMark.Meta``).
RECOMPUTE_PERMISSION = "counts.recompute_counts"
#: Inline style of the "pending" badge (the admin's own warning colours, readable in both the
#: light and dark themes), so the mixin needs no static file of its own.
PENDING_BADGE_STYLE = (
    "background:#ffc107;color:#212529;border-radius:.6em;padding:.1em .6em;"
    "font-weight:600;white-space:nowrap"
)


#: Keeps "12 min ago" on one line when a narrow column wraps its cell.
NBSP = "\u00a0"


def ago(seconds: float) -> str:
    """A short humanized age: "12 s", "4 min", "3 h", "2 days"."""
    seconds = max(0, int(seconds))
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {'day' if unit == 'days' and n == 1 else unit}"
    return f"{seconds} s"


def short_headers(names: list[str]) -> dict[str, str]:
    """Column headers for count fields: without ``_count`` and the words they share.

    ``source_images_count``, ``source_images_with_detections_count`` and
    ``source_images_processed_count`` become "images", "with detections" and "processed": the
    model's list has room for every count and its freshness at a laptop's width.
    """
    stems = [name.removesuffix("_count") + "_" for name in names]
    common = ""
    if len(stems) > 1:
        common = min(stems)
        while not all(stem.startswith(common) for stem in stems):
            common = common[: common.rstrip("_").rfind("_") + 1]
    headers = {}
    for name, stem in zip(names, stems, strict=True):
        rest = stem[len(common) :] or common.rstrip("_").split("_")[-1] + "_"
        headers[name] = rest.rstrip("_").replace("_", " ")
    return headers


@functools.cache
def _count_column(name: str, header: str):
    """A list column showing ``name`` as "12,345", sorted by its column.

    One callable per (name, header), made once: Django's changelist makes a header sortable
    only if its column is in ``get_sortable_by()``, which is ``get_list_display()`` called
    again, and a fresh callable there would never equal the one being displayed.
    """

    def column(obj) -> str:
        return f"{getattr(obj, name):,}"

    column.__name__ = name  # the cell's CSS class: field-<name>
    return admin.display(description=header, ordering=name)(column)


class CachedCountsMixin(ChangePageMixin):
    """Counts, freshness and "Recompute now" for any ``ModelAdmin`` (put the mixin first).

    ``list_display`` lists the admin's own columns; the counts and the freshness column are
    appended by :meth:`get_list_display`, so a count added to the model shows up without
    touching its admin. ``count_headers`` overrides a header ({field name: header}).
    """

    count_headers: dict[str, str] = {}
    #: Most rows "Recompute now" takes in one request: it holds their row locks until it
    #: commits, inside a web worker's timeout. Bigger jobs belong to ``counts reconcile``.
    recompute_now_limit = 10_000

    def count_field_names(self) -> list[str]:
        return [f.name for f in cached_count_fields(self.model)]

    def count_columns(self) -> list:
        names = self.count_field_names()
        headers = {**short_headers(names), **self.count_headers}
        return [_count_column(name, headers[name]) for name in names]

    @property
    def media(self):
        """The admin's media plus ``counts/admin.css`` (compact, right-aligned counts)."""
        return super().media + forms.Media(css={"all": ["counts/admin.css"]})

    def get_list_display(self, request):
        counted = {*self.count_field_names(), FRESHNESS_FIELD, "freshness"}
        own = [
            name
            for name in super().get_list_display(request)
            if name != "__str__" and name not in counted
        ]
        return [*(own or ["__str__"]), *self.count_columns(), "freshness"]

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        changelist.result_list = list(changelist.result_list)
        apply_exact(changelist.result_list)
        return changelist

    def changelist_view(self, request, extra_context=None):
        """The list, its totals written like its counts: "9,931 results (20,000 total)",
        "All 20,000 selected", "20,000 captures" (``counts/admin/change_list.html``)."""
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None) or {}
        cl = context.get("cl")
        if cl is None:
            return response
        shown = f"{cl.result_count:,}"
        full = cl.full_result_count
        context.update(
            counts_numbers={
                "result_count": shown,
                "full_result_count": full if full is None else f"{full:,}",
            },
            counts_search=search_form(cl),
            counts_pagination=pagination(cl),
            selection_note_all=ngettext(
                "%(total_count)s selected", "All %(total_count)s selected", cl.result_count
            )
            % {"total_count": shown},
        )
        return extend_template(response, "counts/admin/change_list.html")

    @admin.display(description="freshness", ordering=FRESHNESS_FIELD)
    def freshness(self, obj) -> str:
        """A "pending" badge while a recompute waits for this row, else how long ago the engine
        last changed its counts (the exact time on hover)."""
        updated: datetime | None = getattr(obj, FRESHNESS_FIELD)
        if updated is None:
            fresh, exact = "never changed", "The counts have kept their initial values."
        else:
            age = ago((timezone.now() - updated).total_seconds()).replace(" ", NBSP)
            fresh = f"updated {age}{NBSP}ago"  # wraps, if at all, after "updated"
            exact = f"Counts last changed at {updated.isoformat(timespec='seconds')}."
        if getattr(obj, "counts_pending", False):
            shown = (
                "The counts shown include it."
                if getattr(obj, "counts_exact", False)
                else "The counts shown are the stored ones, without it."
            )
            return format_html(
                '<span class="counts-pending" style="{}" title="{}">pending</span>',
                PENDING_BADGE_STYLE,
                f"A change is waiting for a worker. {shown} {exact}",
            )
        return format_html('<span class="counts-fresh" title="{}">{}</span>', exact, fresh)

    def get_actions(self, request):
        actions = super().get_actions(request)
        if self.actions is not None and self.has_recompute_permission(request):
            actions.setdefault("recompute_now", self.get_action("recompute_now"))
        return actions

    def has_recompute_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(RECOMPUTE_PERMISSION)

    @admin.action(description="Recompute now", permissions=["recompute"])
    def recompute_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Recompute the selected rows' counts now and say how many were wrong."""
        selected = queryset.count()
        if selected > self.recompute_now_limit:
            self.message_user(
                request,
                f"{selected:,} rows selected; Recompute now takes at most"
                f" {self.recompute_now_limit:,}. Use `manage.py counts reconcile --model"
                f" {self.model._meta.label_lower}` for more.",
                messages.ERROR,
            )
            return
        recomputed, changed = recompute(queryset)
        self.message_user(
            request, f"{recomputed:,} recomputed, {changed:,} changed", messages.SUCCESS
        )


class CachedCountsAdmin(CachedCountsMixin, admin.ModelAdmin):
    """``ModelAdmin`` for a model with cached counts (see :class:`CachedCountsMixin`)."""


def augment(site: admin.AdminSite = admin.site) -> list[str]:
    """Give :class:`CachedCountsMixin` to every admin on ``site`` whose model has cached counts
    and lacks it; returns the labels of the models re-registered.

    The admin class is subclassed with the mixin first and re-registered, so its own columns,
    filters and actions stay.
    """
    augmented = []
    for model, model_admin in list(site._registry.items()):
        if isinstance(model_admin, CachedCountsMixin) or not cached_count_fields(model):
            continue
        base = type(model_admin)
        counted = type(f"Counted{base.__name__}", (CachedCountsMixin, base), {})
        site.unregister(model)
        site.register(model, counted)
        augmented.append(model._meta.label_lower)
    return augmented


def verbose_name_of(label: str) -> str:
    """What an operator calls a mark's target: "capture sets" for
    ``monitoring.sourceimagecollection``; for the item kind ``item:monitoring.sourceimage``,
    "source images (per source image)" (the counts each one feeds, recomputed one by one); the
    label itself if the model is gone."""
    prefix = "item:"
    if label.startswith(prefix):
        try:
            opts = apps.get_model(label[len(prefix) :])._meta
        except (LookupError, ValueError):
            return label
        return f"{opts.verbose_name_plural} (per {opts.verbose_name})"
    try:
        return str(apps.get_model(label)._meta.verbose_name_plural)
    except (LookupError, ValueError):
        return label


class TargetFilter(admin.SimpleListFilter):
    """Filter requests by the model whose counts they recompute, offered by verbose name (every
    model with counts)."""

    title = "counts of"
    parameter_name = "target"

    def lookups(self, request, model_admin):
        labels = sorted(m._meta.label_lower for m in apps.get_models() if cached_count_fields(m))
        return [(label, verbose_name_of(label)) for label in labels]

    def queryset(self, request, queryset):
        return queryset.filter(target=self.value()) if self.value() else queryset


@admin.register(DirtyMark)
class DirtyMarkAdmin(admin.ModelAdmin):
    """What the workers have yet to do: read-only, since marks belong to triggers and drains.

    The summary above the list comes from ``pending_summary()`` (one grouped query); the list
    below pages through the marks themselves without counting them all (the backlog can be
    large exactly when an operator looks).
    """

    change_list_template = "admin/counts/dirtymark/change_list.html"
    list_display = ("request_number", "target_model", "rows", "waiting")
    list_filter = (TargetFilter,)
    ordering = ("id",)
    show_full_result_count = False
    #: The page's title: "marks" are the engine's word for what an operator waits for.
    page_title = "Pending recomputes"

    @admin.display(description="request", ordering="id")
    def request_number(self, mark: DirtyMark) -> str:
        return f"#{mark.pk}"

    @admin.display(description="counts of", ordering="target")
    def target_model(self, mark: DirtyMark) -> str:
        return verbose_name_of(mark.target)

    @admin.display(description="rows")
    def rows(self, mark: DirtyMark) -> str:
        return "every row" if mark.ids is None else f"{len(mark.ids):,}"

    @admin.display(description="waiting since", ordering="created_at")
    def waiting(self, mark: DirtyMark) -> str:
        """ "3 min ago", the exact time on hover."""
        age = ago((timezone.now() - mark.created_at).total_seconds())
        return format_html(
            '<span title="{}">{} ago</span>', mark.created_at.isoformat(timespec="seconds"), age
        )

    def changelist_view(self, request, extra_context=None):
        summary = [
            {
                "label": entry.label,
                "model": verbose_name_of(entry.label),
                "marks": entry.marks,
                "requests": f"{entry.marks:,}",
                "rows": "every row" if entry.ids is None else entry.ids,
                "rows_shown": "every row" if entry.ids is None else f"{entry.ids:,}",
                "oldest_seconds": round(max(0.0, entry.oldest_seconds), 1),
                "oldest": f"{ago(entry.oldest_seconds)} ago",
            }
            for entry in pending_summary()
        ]
        return super().changelist_view(
            request,
            {**(extra_context or {}), "pending_summary": summary, "title": self.page_title},
        )

    def get_changelist_instance(self, request):
        """The list, with its total written "12,345" for the paginator's "12,345 requests"."""
        changelist = super().get_changelist_instance(request)
        changelist.result_count_shown = f"{changelist.result_count:,}"
        return changelist

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return super().change_view(
            request, object_id, form_url, {**(extra_context or {}), "title": "Pending recompute"}
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
