"""Pagination, id filters, search and ordering for the list endpoints, all strict (``params``).

Filtering and ordering are a django-filter ``FilterSet`` per endpoint, built from three filters:
:class:`IdFilter` (``?project_id=``, ``?deployment_id=``: a positive bigint, and a row the caller
may read), :class:`SearchFilter` (``?search=``: DRF ``SearchFilter`` terms over names) and the
engine's :class:`counts.surfaces.rest.SortFilter` (``?ordering=``: comma-separated keys, ``-`` for
descending, ties broken by id). :class:`StrictFilterBackend` turns the first invalid value into
the API's 400 naming it, before any query runs. Each filter publishes its schema (bounds,
choices, pattern) through drf-spectacular's django-filter support, with the same bounds and
choices it enforces.

An empty filter value (``?project_id=&ordering=``) is the filter left out: that is what the
browsable API's filter form submits for a field left blank, so refusing it would make the form
unusable. Unknown parameters and invalid non-empty values are still refused; ``limit`` and
``offset``, which no form sends, stay strict about emptiness too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import OuterRef, Q, Subquery
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.contrib.django_filters import DjangoFilterExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework.filters import search_smart_split
from rest_framework.pagination import LimitOffsetPagination

from project.monitoring.api.params import (
    DEFAULT_LIMIT,
    MAX_ID,
    MAX_LIMIT,
    MAX_OFFSET,
    BadParameter,
    bounded_int,
    integer_schema,
    parse_bounded,
    query_parameter,
)


class StrictLimitOffsetPagination(LimitOffsetPagination):
    """Limit/offset pagination that refuses bad values instead of falling back to defaults.

    Both values are parsed before the count query, so a bad request costs no database work.
    ``limit`` is 1 to 1000 (default 25); ``offset`` is 0 to 2**31 - 1, and an offset past the
    end gives an empty page.
    """

    default_limit = DEFAULT_LIMIT
    max_limit = MAX_LIMIT

    def parameter_names(self) -> list[str]:
        return [self.limit_query_param, self.offset_query_param]

    def check(self, request) -> None:
        """Parse both values now (the view calls this before filtering)."""
        self._limit = self._parse(request, self.limit_query_param, 1, MAX_LIMIT, DEFAULT_LIMIT)
        self._offset = self._parse(request, self.offset_query_param, 0, MAX_OFFSET, 0)

    @staticmethod
    def _parse(request, name: str, minimum: int, maximum: int, default: int) -> int:
        raw = request.query_params.get(name)
        return default if raw is None else bounded_int(name, raw, minimum, maximum)

    def paginate_queryset(self, queryset, request, view=None):
        self.check(request)
        return super().paginate_queryset(queryset, request, view)

    def get_limit(self, request):
        return self._limit

    def get_offset(self, request):
        return self._offset

    def get_schema_operation_parameters(self, view):
        return [
            query_parameter(
                self.limit_query_param,
                f"Results per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}).",
                {**integer_schema(1, MAX_LIMIT), "default": DEFAULT_LIMIT},
            ),
            query_parameter(
                self.offset_query_param,
                "Index of the first result (default 0). Past the end gives an empty page.",
                {**integer_schema(0, MAX_OFFSET), "default": 0},
            ),
        ]


class IdField(forms.Field):
    """A row id: plain ASCII digits, 1 to 2**63 - 1. Absent or empty is None (no filter: see
    the module docstring)."""

    def clean(self, value):
        if value is None or value == "":
            return None
        try:
            return parse_bounded(value, 1, MAX_ID)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class IdFilter(django_filters.Filter):
    """Equality on an id, after checking that the request may read that row.

    Args:
        require: ``require(user, id)`` raises 401/403 when the caller may not read the row
            (``project.monitoring.api.access``); one query, and only when the filter is given.
    """

    field_class = IdField

    def __init__(self, *, require: Callable[[object, int], None], **kwargs) -> None:
        noun = kwargs["field_name"].removesuffix("_id").split("__")[-1]
        kwargs.setdefault("label", f"{noun.capitalize()} id")
        super().__init__(**kwargs)
        self.require = require
        schema = {**integer_schema(1, MAX_ID), "description": f"Only rows of this {noun}."}
        extend_schema_field(schema)(self)

    def filter(self, qs, value):
        if value is None:
            return qs
        self.require(self.parent.request.user, value)
        return qs.filter(**{self.field_name: value})


class SearchField(forms.Field):
    """Search terms, split as DRF's ``SearchFilter`` does (whitespace or commas; a quoted phrase
    is one term). Absent, empty or blank is no search. A NUL character is refused: PostgreSQL
    text cannot hold one, so the query would fail instead of matching nothing."""

    def clean(self, value):
        if value is None:
            return None
        if "\x00" in value:
            raise ValidationError("must not contain a NUL character.")
        return search_smart_split(value)


class SearchFilter(django_filters.Filter):
    """``?search=`` with DRF ``SearchFilter`` semantics: every term must occur, ignoring case,
    in at least one of ``fields`` (e.g. ``("name",)`` or ``("deployment__name",)``).

    A filter of the FilterSet rather than DRF's backend so that it is checked, documented and
    shown in the filter form like the other parameters; a join to a parent's name adds no query.
    """

    field_class = SearchField

    def __init__(self, *, fields: tuple[str, ...], **kwargs) -> None:
        kwargs.setdefault("label", "Search")
        super().__init__(**kwargs)
        self.fields = fields
        where = " or ".join(_described(field) for field in fields)
        extend_schema_field(
            {
                "type": "string",
                "pattern": "^[^\\x00]*$",
                "description": "Search terms, separated by spaces or commas (quote a phrase);"
                f" each must occur, ignoring case, in the {where}.",
            }
        )(self)

    def filter(self, qs, value):
        for term in value or ():
            qs = qs.filter(
                reduce(operator.or_, (Q(**{f"{field}__icontains": term}) for field in self.fields))
            )
        return qs


def _described(path: str) -> str:
    """``deployment__name`` -> "deployment's name", for the schema."""
    return path.replace("__", "'s ")


class WithCountsFilter(django_filters.ChoiceFilter):
    """``?with_counts=true|false``, which Antenna's clients send to its capture-set list: the
    counts are cached columns here and always in the response, so it changes nothing. Accepted
    rather than refused as unknown; a value that is not one of these is still a 400."""

    CHOICES = (("true", "true"), ("false", "false"), ("1", "1"), ("0", "0"))

    def __init__(self) -> None:
        super().__init__(
            choices=self.CHOICES,
            method=lambda queryset, name, value: queryset,
            # Not a model field: without a label, django-filter's form names it "[invalid name]".
            label="With counts",
            help_text="Accepted for Antenna's clients; counts are always included.",
        )


class StrictFilterBackend(DjangoFilterBackend):
    """django-filter's backend, answering an invalid value with the API's 400 naming it."""

    def parameter_names(self, view) -> list[str]:
        return list(view.filterset_class.base_filters)

    def filter_queryset(self, request, queryset, view):
        filterset = self.get_filterset(request, queryset, view)
        if not filterset.is_valid():
            name, errors = next(iter(filterset.errors.items()))
            raise BadParameter(name, f"{name} {errors[0]}")
        return filterset.qs


class StrictFilterExtension(DjangoFilterExtension):
    """Publishes each filter as drf-spectacular does, marked ``allowEmptyValue``: an empty value
    is accepted as "no filter" (module docstring), and schema-driven clients and fuzzers must
    know it is valid input rather than expect a 400."""

    target_class = StrictFilterBackend
    priority = 1

    def resolve_filter_field(self, *args, **kwargs):
        parameters = super().resolve_filter_field(*args, **kwargs)
        # A required filter (the taxa list's project) has no "no filter": empty is a 400.
        return [
            parameter if parameter.get("required") else {**parameter, "allowEmptyValue": True}
            for parameter in parameters
        ]


class ProjectTaxaFilter(IdFilter):
    """``?project_id=`` of the taxa list, required: a taxon's count is per project, and never
    summed across projects a caller may not all read. Keeps the taxa with a counted occurrence
    in the project and annotates each with their number, ``occurrences_count``, read from
    ``counts``' grouped count (``grouped(project_id)``: ``{taxon id: n}`` rows as a queryset
    with ``value`` and ``n``)."""

    def __init__(self, *, grouped: Callable[[int], object], **kwargs) -> None:
        super().__init__(required=True, **kwargs)
        self.grouped = grouped

    def filter(self, qs, value):
        if value is None:
            raise BadParameter(
                "project_id", "project_id is required: taxa are counted per project."
            )
        self.require(self.parent.request.user, value)
        rows = self.grouped(value)
        count = rows.filter(value=OuterRef("pk")).values("n")[:1]
        return qs.filter(pk__in=rows.values("value")).annotate(occurrences_count=Subquery(count))
