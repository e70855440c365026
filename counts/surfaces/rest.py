"""Django REST framework support: list endpoints that serve cached counts with their freshness.

Optional: this module imports DRF and django-filter, so only apps that serve counts over DRF
import it (the rest of the engine does not). What a model with ``CachedCountField`` columns gets
from it, with no per-count code:

- :func:`counted_fields` / :class:`CountedSerializer` / :func:`counted_serializer`: every cached
  count in declaration order, then ``counts_pending``, ``counts_exact`` and
  ``counts_updated_at`` — a count added to a model appears in its endpoints without editing
  them;
- :func:`count_orderings` / :class:`SortFilter` / :func:`counted_filterset`: ``?ordering=`` by one
  or more cached counts (or freshness), read from their columns with no aggregate, ties broken
  by id;
- :class:`CountedListView`: reads each page's counts exact (:func:`counts.run.exact.apply_exact`:
  pending changes included, before any worker drains them) with one statement for the page,
  whatever its size; :class:`CountedDetailView` does the same for one row.

Freshness tells a client how far to trust a count: ``counts_exact`` is true when the counts
include every change committed before the response (and, in the same transaction, its own);
``counts_pending`` is true while a change that may alter this row's counts waits for a worker
(its stored value will follow), and ``counts_updated_at`` is when the engine last stored them
(null if never). Sorting by a count (``?ordering=``) sorts by the stored value: a row whose
exact value differs says so with ``counts_pending``.

The smallest endpoint::

    class EventList(CountedListView):
        queryset = Event.objects.all()

Access rules, stricter parameter handling and domain filters stay in the app that serves the
endpoint (subclass :class:`CountedListView`, pass filters to :func:`counted_filterset`).
"""

from __future__ import annotations

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import serializers
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.pagination import LimitOffsetPagination

from counts.base.names import FRESHNESS_FIELD
from counts.declare.field import cached_count_fields
from counts.run.exact import EXACT_FIELD, PENDING_FIELD, apply_exact

try:  # the OpenAPI description of the ordering parameter, when drf-spectacular is installed
    from drf_spectacular.utils import extend_schema_field
except ImportError:  # pragma: no cover - the schema is documentation only

    def extend_schema_field(_schema):
        return lambda target: target


def counted_fields(model, *leading: str) -> tuple[str, ...]:
    """``leading`` fields, then every cached count of ``model`` in declaration order, then
    freshness — so a count added to a model appears in its endpoint without editing it."""
    counts = tuple(f.name for f in cached_count_fields(model))
    return (*leading, *counts, PENDING_FIELD, EXACT_FIELD, FRESHNESS_FIELD)


class CountedSerializer(serializers.ModelSerializer):
    """Base for models with cached counts: adds the per-row ``counts_pending`` and
    ``counts_exact`` flags."""

    counts_pending = serializers.BooleanField(
        read_only=True,
        help_text="A change that may alter these counts is waiting to be recomputed.",
    )
    counts_exact = serializers.BooleanField(
        read_only=True,
        help_text="The counts are exact as of this response, pending changes included; false:"
        " a count is its stored value (plus queued amounts) because its pending work was too"
        " large to resolve in a read, or the row waits for a recount. Sorting by a count sorts"
        " by its stored value.",
    )


def counted_serializer(model, *leading: str) -> type[CountedSerializer]:
    """A read-only serializer of ``model``: ``leading`` fields (the id when none), its counts
    and their freshness."""
    fields = counted_fields(model, *(leading or ("id",)))
    meta = type("Meta", (), {"model": model, "fields": fields, "read_only_fields": fields})
    return type(f"{model.__name__}CountsSerializer", (CountedSerializer,), {"Meta": meta})


def count_orderings(model) -> dict[str, str]:
    """Every cached count (and freshness) is a sort key, named as its column."""
    names = [f.name for f in cached_count_fields(model)]
    return {**{name: name for name in names}, FRESHNESS_FIELD: FRESHNESS_FIELD}


class SortField(forms.Field):
    """One sort key of ``sort_keys`` (``name`` or ``-name``).

    :class:`SortFilter` wraps it in django-filter's CSV field, which splits ``?ordering=a,-b``
    into keys and cleans each here, and reads an empty ``?ordering=`` (what an HTML form sends
    when nothing is chosen) as no key: the default order.
    """

    #: A menu of single keys in the browsable API's filter form (a comma list is shown as text).
    widget = forms.Select

    def __init__(self, *, sort_keys: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.choices = sort_keys
        self.widget.choices = [("", "(default order)"), *((key, key) for key in sort_keys)]

    def clean(self, value):
        if value not in self.choices:
            raise ValidationError(
                f"{value!r} is not a sort key of this endpoint; give one or more of"
                f" {', '.join(self.choices)}, separated by commas."
            )
        return value


class SortFilter(django_filters.BaseCSVFilter):
    """``?ordering=key`` or ``-key``, or several comma-separated (``-captures_count,name``),
    over ``keys`` ({public name: column}) — DRF ``OrderingFilter`` semantics, but strict.

    Unlike DRF's and django-filter's ordering filters it refuses a key it does not know (the
    whole list, not half-applied) and always orders: by ``default`` when absent or empty, with
    the id as the last tie-break in the direction of the last key, so pages never overlap and
    ``-a,-b`` is exactly the reverse of ``a,b``. Counts sort by their cached column, with no
    aggregate at read time.
    """

    field_class = SortField

    def __init__(self, *, keys: dict[str, str], default: str, **kwargs) -> None:
        choices = [f"{sign}{name}" for name in keys for sign in ("", "-")]
        kwargs.setdefault("label", "Ordering")
        kwargs.setdefault("help_text", "One key, or several separated by commas; '-' descends.")
        super().__init__(sort_keys=choices, **kwargs)
        self.keys, self.default = keys, default
        # drf-spectacular publishes a CSV filter as an array of these, comma-separated.
        extend_schema_field(
            {
                "type": "string",
                "enum": choices,
                "description": "Sort keys, comma-separated; a leading '-' sorts descending."
                f" Default {default}; ties are broken by id.",
            }
        )(self)

    def filter(self, qs, value):
        given = value or [self.default]
        columns = [f"{_sign(key)}{self.keys[key.removeprefix('-')]}" for key in given]
        if "pk" not in {column.removeprefix("-") for column in columns}:
            columns.append(f"{_sign(given[-1])}pk")
        return qs.order_by(*columns)


def _sign(key: str) -> str:
    return "-" if key.startswith("-") else ""


def counted_filterset(
    model, keys: dict[str, str] | None = None, default: str = "id", **filters
) -> type[django_filters.FilterSet]:
    """A FilterSet for ``model``: the given ``filters`` and ``ordering`` over ``keys`` (default
    ``{"id": "pk"}``) plus every cached count and freshness (:func:`count_orderings`)."""
    keys = {**(keys if keys is not None else {"id": "pk"}), **count_orderings(model)}
    attrs = {**filters, "ordering": SortFilter(keys=keys, default=default)}
    attrs["Meta"] = type("Meta", (), {"model": model, "fields": []})
    return type(f"{model.__name__}Filter", (django_filters.FilterSet,), attrs)


class _CountedDefaults:
    """Fill in the serializer and filters of a subclass that names only its queryset."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        model = getattr(cls.queryset, "model", None)
        if model is None:
            return
        if cls.serializer_class is None:
            cls.serializer_class = counted_serializer(model)
        if getattr(cls, "filterset_class", False) is None:
            cls.filterset_class = counted_filterset(model)


class CountedListView(_CountedDefaults, ListAPIView):
    """A paginated list of a model with cached counts, each row flagged ``counts_pending``.

    A subclass need only set ``queryset``: ``serializer_class`` defaults to
    :func:`counted_serializer` of its model and ``filterset_class`` to :func:`counted_filterset`
    (ordering by id or any count). The flags cost one query per page, whatever its size, so the
    view needs a paginator (limit/offset unless a subclass says otherwise).
    """

    pagination_class = LimitOffsetPagination
    filter_backends = (DjangoFilterBackend,)
    filterset_class = None

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        apply_exact(page or [])
        return page


class CountedDetailView(_CountedDefaults, RetrieveAPIView):
    """One row of a model with cached counts, in the same shape as :class:`CountedListView`'s
    rows: its counts taken with ``counts_pending`` in one snapshot (one query besides the row's
    own), so a client following a list row to its detail reads the same freshness."""

    def get_object(self):
        row = super().get_object()
        apply_exact([row])
        return row
