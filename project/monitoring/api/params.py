"""Strict parsing of the list endpoints' query parameters.

DRF's stock pagination and ordering quietly ignore what they cannot read (``?limit=abc`` gives
the default page, ``?ordering=nope`` the default order). A client that mistypes a parameter then
reads a wrong page and never learns why; a value PostgreSQL cannot hold (an id past bigint)
becomes a 500. Here every parameter is parsed before the first query runs, and anything outside
what the OpenAPI schema declares — including a parameter the endpoint does not take, or one
given twice — is answered with HTTP 400 and a body naming the parameter::

    {"parameter": "limit", "detail": "limit must be an integer from 1 to 1000, got '0'."}

The bounds below are also what the schema publishes, so the schema and the validation cannot
disagree (schemathesis checks that both ways).
"""

from __future__ import annotations

import re

from rest_framework import serializers, status
from rest_framework.exceptions import APIException

#: Largest page a client may ask for; a bigger ``limit`` is refused, not silently cut.
MAX_LIMIT = 1000
#: Page size when ``limit`` is absent.
DEFAULT_LIMIT = 25
#: Largest ``offset`` accepted (PostgreSQL int4 range; deeper pages are not a use case).
MAX_OFFSET = 2**31 - 1
#: Largest id a filter accepts: ids are ``bigint``, and a larger literal would fail in SQL.
MAX_ID = 2**63 - 1

#: Plain ASCII digits only: ``int()`` would also take "+1", " 1", "1_000" and Arabic digits.
_DIGITS = re.compile(r"\A[0-9]+\Z")


class BadParameter(APIException):
    """A query parameter the endpoint cannot honour; rendered as HTTP 400."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_parameter"

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__({"parameter": parameter, "detail": message})
        self.parameter = parameter


class BadParameterSerializer(serializers.Serializer):
    """Schema of a 400 answer (documentation only)."""

    parameter = serializers.CharField(help_text="The query parameter that was refused.")
    detail = serializers.CharField(help_text="Why, and what would be accepted.")


class DetailSerializer(serializers.Serializer):
    """Schema of a 401 or 403 answer (documentation only)."""

    detail = serializers.CharField(help_text="Why the request was refused.")


def parse_bounded(raw: str, minimum: int, maximum: int) -> int:
    """Parse ``raw`` as a base-10 integer within [minimum, maximum].

    Raises:
        ValueError: with a message that completes "<parameter> …", e.g. "must be an integer
            from 1 to 1000, got '0'."
    """
    value = int(raw) if _DIGITS.match(raw) and len(raw.lstrip("0")) <= 20 else None
    if value is None or not minimum <= value <= maximum:
        raise ValueError(f"must be an integer from {minimum} to {maximum}, got {raw!r}.")
    return value


def bounded_int(parameter: str, raw: str, minimum: int, maximum: int) -> int:
    """:func:`parse_bounded`, refusing with a BadParameter that names ``parameter``."""
    try:
        return parse_bounded(raw, minimum, maximum)
    except ValueError as exc:
        raise BadParameter(parameter, f"{parameter} {exc}") from None


def check_names(query_params, accepted: list[str]) -> None:
    """Refuse a parameter the endpoint does not take, or one given more than once.

    Both would otherwise be ignored without a word: ``?page=2`` (this API pages with
    ``offset``) would return the first page, and ``?project_id=1&project_id=2`` only project 2.
    """
    for name in query_params:
        if name not in accepted:
            raise BadParameter(
                name, f"{name} is not a parameter of this endpoint; it takes {', '.join(accepted)}."
            )
        given = len(query_params.getlist(name))
        if given > 1:
            raise BadParameter(name, f"{name} was given {given} times; give it at most once.")


def integer_schema(minimum: int, maximum: int) -> dict:
    """OpenAPI schema for an integer parameter with the bounds validation enforces."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def query_parameter(name: str, description: str, schema: dict) -> dict:
    """One OpenAPI query parameter object, in the form DRF's schema hooks return."""
    return {
        "name": name,
        "required": False,
        "in": "query",
        "description": description,
        "schema": schema,
    }
