"""Walking a declaration's ``Q`` filter: what the checks and the spec both read from it."""

from __future__ import annotations

from django.db.models import F, Q


def lookups(q: Q):
    """Every (lookup, value) pair inside a Q, however nested."""
    for child in q.children:
        if isinstance(child, Q):
            yield from lookups(child)
        else:
            yield child


def f_refs(value):
    """``F()`` names inside a lookup's value (plain values contribute none)."""
    if isinstance(value, F):
        yield value.name
        return
    for source in getattr(value, "get_source_expressions", lambda: [])():
        yield from f_refs(source)
