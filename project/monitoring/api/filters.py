"""Pagination, id filters and ordering for the list endpoints, all strict (see ``params``).

Each piece is a DRF extension point (pagination class, filter backend) configured by plain
attributes on the view, and each publishes its parameters to the OpenAPI schema through
``get_schema_operation_parameters`` with the same bounds and choices it enforces.
"""

from __future__ import annotations

from rest_framework.filters import BaseFilterBackend
from rest_framework.pagination import LimitOffsetPagination

from project.monitoring.api.params import (
    DEFAULT_LIMIT,
    MAX_ID,
    MAX_LIMIT,
    MAX_OFFSET,
    BadParameter,
    bounded_int,
    integer_schema,
    parse_id,
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

    def paginate_queryset(self, queryset, request, view=None):
        self._limit = self._parse(request, self.limit_query_param, 1, MAX_LIMIT, DEFAULT_LIMIT)
        self._offset = self._parse(request, self.offset_query_param, 0, MAX_OFFSET, 0)
        return super().paginate_queryset(queryset, request, view)

    @staticmethod
    def _parse(request, name: str, minimum: int, maximum: int, default: int) -> int:
        raw = request.query_params.get(name)
        return default if raw is None else bounded_int(name, raw, minimum, maximum)

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


class IdFilters(BaseFilterBackend):
    """Equality filters on ids, declared by the view as ``id_filters = {param: lookup}``."""

    def filter_queryset(self, request, queryset, view):
        for param, lookup in view.id_filters.items():
            raw = request.query_params.get(param)
            if raw is not None:
                queryset = queryset.filter(**{lookup: parse_id(param, raw)})
        return queryset

    def get_schema_operation_parameters(self, view):
        return [
            query_parameter(
                param, f"Only rows of this {param.removesuffix('_id')}.", integer_schema(1, MAX_ID)
            )
            for param in view.id_filters
        ]


class StrictOrdering(BaseFilterBackend):
    """``?ordering=field`` or ``-field`` over the view's ``ordering_fields`` ({public: column}).

    Ties are broken by id in the same direction, so pages never overlap and ``-x`` is exactly the
    reverse of ``x``. Counts sort by their cached column — no aggregate at read time.
    """

    param = "ordering"

    @staticmethod
    def choices(view) -> list[str]:
        return [f"{sign}{name}" for name in view.ordering_fields for sign in ("", "-")]

    def filter_queryset(self, request, queryset, view):
        raw = request.query_params.get(self.param, view.default_ordering)
        name = raw.removeprefix("-")
        if name not in view.ordering_fields:
            raise BadParameter(
                self.param,
                f"ordering {raw!r} is not one of: {', '.join(self.choices(view))}.",
            )
        sign = "-" if raw.startswith("-") else ""
        return queryset.order_by(f"{sign}{view.ordering_fields[name]}", f"{sign}pk")

    def get_schema_operation_parameters(self, view):
        return [
            query_parameter(
                self.param,
                "Sort key; a leading '-' sorts descending (ties broken by id).",
                {
                    "type": "string",
                    "enum": self.choices(view),
                    "default": view.default_ordering,
                },
            )
        ]
