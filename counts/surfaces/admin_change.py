"""The change page of a row with cached counts, as ``counts.admin.CachedCountsMixin`` serves it.

Split from ``counts.admin`` to keep each module readable; nothing here imports it (the mixin
below only calls methods ``CachedCountsMixin`` defines: ``count_columns``, ``freshness``,
``has_recompute_permission``).

On the page of one station, night or capture set an operator sees what the list shows, in the
same words: each count under its list header with thousands separators ("Images: 9,931", not
"Source images count: 9931"), read-only; its freshness ("pending", "updated 12 s ago"); and,
with ``counts.recompute_counts``, a "Recompute now" button for that one row, so that checking
a number someone doubts does not mean going back to the list to tick one box.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.loader import select_template
from django.template.response import TemplateResponse
from django.urls import path, reverse

from counts.base.names import FRESHNESS_FIELD
from counts.operate.recomputing import recompute
from counts.run.exact import apply_exact

#: Context variable holding the template a counts template extends (see :func:`extend_template`).
PARENT = "counts_parent_template"


def extend_template(response, template_name: str):
    """Render ``response`` with ``template_name``, which ``{% extends counts_parent_template %}``:
    the template the admin would have used.

    So the counts' additions (a button, formatted numbers) go on top of whatever template an
    admin chose, Django's or its own, instead of replacing it: the mixin also serves admins it
    was added to by ``counts.admin.augment``. Anything but an unrendered template response (a
    redirect after an action, say) is returned as it is.
    """
    if not isinstance(response, TemplateResponse) or response.is_rendered:
        return response
    names = response.template_name
    response.context_data[PARENT] = select_template([names] if isinstance(names, str) else names)
    response.template_name = template_name
    return response


class ChangePageMixin:
    """Counts under short labels, freshness and "Recompute now" on a counted row's page."""

    def get_readonly_fields(self, request, obj=None):
        """The admin's own read-only fields, then every count as its list column shows it
        (label and "12,345"), then freshness on an existing row's page."""
        counted = {*self.count_field_names(), FRESHNESS_FIELD, "freshness"}
        own = [f for f in super().get_readonly_fields(request, obj) if f not in counted]
        return [*own, *self.count_columns(), *(["freshness"] if obj is not None else [])]

    def get_urls(self):
        opts = self.opts
        recompute = path(
            "<path:object_id>/recompute/",
            self.admin_site.admin_view(self.recompute_view),
            name=f"{opts.app_label}_{opts.model_name}_recompute",
        )
        return [recompute, *super().get_urls()]

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        """Read the row's counts exact, with its pending flag (one query, so the page never
        says "updated" beside older numbers), and offer "Recompute now"."""
        if obj is not None and obj.pk is not None and not add:
            apply_exact([obj])
            if self.has_recompute_permission(request):
                opts = self.opts
                context["counts_recompute_url"] = reverse(
                    f"admin:{opts.app_label}_{opts.model_name}_recompute",
                    args=[quote(obj.pk)],
                    current_app=self.admin_site.name,
                )
        response = super().render_change_form(request, context, add, change, form_url, obj)
        return extend_template(response, "counts/admin/change_form.html")

    def recompute_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Recompute one row's counts now (POST), then back to its page with what happened.

        The same call as the list's "Recompute now" action, under the same permission: it
        takes the row's lock like a drain does.
        """
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_recompute_permission(request):
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_or_change_permission(request, obj):
            raise PermissionDenied
        recomputed, changed = recompute([obj])
        if changed:
            said = f"Recomputed: the counts of “{obj}” were out of date and are now corrected."
        elif recomputed:
            said = f"Recomputed: the counts of “{obj}” were already right."
        else:
            said = (
                f"“{obj}” is being changed by another request: a worker will recompute its"
                " counts as soon as that change is done."
            )
        self.message_user(request, said, messages.SUCCESS if recomputed else messages.WARNING)
        opts = self.opts
        return HttpResponseRedirect(
            reverse(
                f"admin:{opts.app_label}_{opts.model_name}_change",
                args=[quote(obj.pk)],
                current_app=self.admin_site.name,
            )
        )
