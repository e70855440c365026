"""A count's filter, taken apart: its conditions relative to one row of the path, and as SQL
over that row.

The classifier (``counts.declare.classify``) asks one question of a filter again and again:
which rows of the path does it read, and can the part that reads a row be written as a
predicate over that row alone? A trigger or a drain then evaluates it on that row, never by a
join. Anything these functions cannot place (a join Django keeps, a value that cannot be
written into SQL text, an OR across rows) makes the count full, with the reason they give.
"""

from __future__ import annotations

from django.db import connections
from django.db.models import F, Q

from counts.base.names import sql_value


def row_predicate(model, conditions: Q | None) -> str | None:
    """``conditions`` (lookups on ``model``'s own columns) as SQL over the alias ``r``.

    Raises ValueError when the conditions join other tables or use values that cannot be
    written into a trigger's text (the count then stays full).
    """
    if conditions is None or not conditions.children:
        return None
    qs = model._base_manager.filter(conditions)
    compiler = qs.query.get_compiler(connection=connections["default"])
    sql, params = compiler.compile(qs.query.where)
    # A join Django trimmed (``fk__isnull``, ``fk=None``: the row's own column) stays in the
    # alias map with no reference; only joins the condition still reads count.
    joined = {alias for alias, refs in qs.query.alias_refcount.items() if refs}
    if joined - {model._meta.db_table} or any(
        f'"{alias}".' in sql for alias in set(qs.query.alias_map) - {model._meta.db_table}
    ):
        raise ValueError("the filter joins other tables")
    table = f'"{model._meta.db_table}".'
    if '"' + model._meta.db_table + '"' in sql.replace(table, ""):
        raise ValueError("the filter refers to its own table")
    sql = sql.replace(table, "r.")
    if "%s" in sql and len(params) != sql.count("%s"):
        raise ValueError("unexpected parameters")
    for value in params:
        sql = sql.replace("%s", sql_value(value), 1)
    return sql


def relative(q: Q, prefix: str) -> Q | None:
    """The conditions with ``prefix`` stripped, or None when one does not start with it."""
    children = []
    for child in q.children:
        if isinstance(child, Q):
            inner = relative(child, prefix)
            if inner is None:
                return None
            children.append(inner)
        else:
            lookup, value = child
            if not lookup.startswith(prefix) or has_f(value):
                return None
            children.append((lookup[len(prefix) :], value))
    return Q(*children, _connector=q.connector, _negated=q.negated)


def has_f(value) -> bool:
    if isinstance(value, F):
        return True
    return any(has_f(s) for s in getattr(value, "get_source_expressions", lambda: [])())


def split(conditions: Q, own: str, items: str) -> tuple[Q | None, Q | None] | str:
    """``conditions`` as ``(on the counted rows, on the items)``, each relative to its rows
    (``own`` and ``items`` are their lookup prefixes), or why they cannot be split: an AND of
    conditions on those two rows only (an OR across them would need both rows at once)."""
    whole = relative(conditions, own)
    if whole is not None:
        return whole, None
    flat = not conditions.negated and conditions.connector == Q.AND
    if not flat or any(isinstance(c, Q) for c in conditions.children):
        return "its filter reads the items above the counted rows in an OR or a NOT"
    mine, theirs = [], []
    for lookup, value in conditions.children:
        if has_f(value):
            return "its filter compares with a value reached by F() along a long path"
        if lookup.startswith(own):
            mine.append((lookup[len(own) :], value))
        elif lookup.startswith(items):
            theirs.append((lookup[len(items) :], value))
        else:
            return "its filter reads rows above the items (the rows one hop above the counted)"
    return (Q(*mine) if mine else None), Q(*theirs)
