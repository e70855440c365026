"""Admin for cached counts, reusable by any app: it imports nothing from the domain.

Two pieces:

- :class:`CachedCountsAdmin`, a ``ModelAdmin`` base for a model with ``CachedCountField``\\ s.
  Its list shows every count (sortable: they are plain columns) and their freshness — whether a
  dirty mark is waiting for the row (one query per page, not per row) and when the engine last
  changed its counts. Its **"Recompute now"** action recomputes the selected rows synchronously,
  under the same locks as a drain, and is offered only to users holding
  ``counts.recompute_counts``: staff status alone does not let anyone take row locks on a
  900k-image capture set.
- :class:`DirtyMarkAdmin`, a read-only page for operators: the backlog per target model (marks,
  rows, age of the oldest) above the waiting marks themselves (template:
  ``counts/templates/admin/counts/dirtymark/change_list.html``).
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

import counts
from counts.fields import FRESHNESS_FIELD, cached_count_fields
from counts.marks import flag_pending, pending_summary
from counts.models import DirtyMark

#: The permission that unlocks "Recompute now" (declared on ``DirtyMark.Meta``).
RECOMPUTE_PERMISSION = "counts.recompute_counts"


class CachedCountsAdmin(admin.ModelAdmin):
    """``ModelAdmin`` for a model with cached counts.

    Subclasses set ``list_display`` to their own columns; the counts and the two freshness
    columns are appended by :meth:`get_list_display`, so a count added to the model shows up
    without touching its admin. Add to ``actions`` as ``(*CachedCountsAdmin.actions, ...)``.
    """

    actions = ("recompute_now",)
    #: Most rows "Recompute now" takes in one request: it holds their row locks until it
    #: commits, inside a web worker's timeout. Bigger jobs belong to ``counts reconcile``.
    recompute_now_limit = 10_000

    def count_field_names(self) -> list[str]:
        return [f.name for f in cached_count_fields(self.model)]

    def get_list_display(self, request):
        own = [name for name in super().get_list_display(request) if name != "__str__"]
        return [*(own or ["__str__"]), *self.count_field_names(), "pending", FRESHNESS_FIELD]

    def get_readonly_fields(self, request, obj=None):
        extra = [*self.count_field_names(), FRESHNESS_FIELD]
        return [*super().get_readonly_fields(request, obj), *extra]

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        changelist.result_list = list(changelist.result_list)
        flag_pending(changelist.result_list)
        return changelist

    @admin.display(boolean=True, description="counts pending")
    def pending(self, obj) -> bool | None:
        """Whether a change to these counts is waiting for a worker (None off the list page)."""
        return getattr(obj, "counts_pending", None)

    def has_recompute_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(RECOMPUTE_PERMISSION)

    @admin.action(description="Recompute now", permissions=["recompute"])
    def recompute_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Recompute the selected rows' counts now and say how many were wrong."""
        selected = queryset.count()
        if selected > self.recompute_now_limit:
            self.message_user(
                request,
                f"{selected} rows selected; Recompute now takes at most"
                f" {self.recompute_now_limit}. Use `manage.py counts reconcile --model"
                f" {self.model._meta.label_lower}` for more.",
                messages.ERROR,
            )
            return
        recomputed, changed = counts.recompute(queryset)
        self.message_user(request, f"{recomputed} recomputed, {changed} changed", messages.SUCCESS)


@admin.register(DirtyMark)
class DirtyMarkAdmin(admin.ModelAdmin):
    """What the workers have yet to do: read-only, since marks belong to triggers and drains.

    The summary above the list comes from ``pending_summary()`` (one grouped query); the list
    below pages through the marks themselves without counting them all (the backlog can be
    large exactly when an operator looks).
    """

    change_list_template = "admin/counts/dirtymark/change_list.html"
    list_display = ("id", "target", "rows", "created_at")
    list_filter = ("target",)
    ordering = ("id",)
    show_full_result_count = False

    @admin.display(description="rows")
    def rows(self, mark: DirtyMark) -> str:
        return "every row" if mark.ids is None else str(len(mark.ids))

    def changelist_view(self, request, extra_context=None):
        summary = [
            {
                "label": entry.label,
                "marks": entry.marks,
                "rows": "every row" if entry.ids is None else entry.ids,
                "oldest_seconds": round(entry.oldest_seconds, 1),
            }
            for entry in pending_summary()
        ]
        return super().changelist_view(
            request, {**(extra_context or {}), "pending_summary": summary}
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
