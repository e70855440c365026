"""A count's filter, taken apart: its conditions relative to one row of the path, and as SQL
over that row.

The classifier (``counts.declare.classify``) asks one question of a filter again and again:
which rows of the path does it read, and can the part that reads a row be written as a
predicate over that row alone? A trigger or a drain then evaluates it on that row, never by a
join. Anything these functions cannot place (a join Django keeps, a value that cannot be
written into SQL text, an OR across rows) makes the count full, with the reason they give.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Split:
    """A filter over the counted rows and the rows above them, as the item's test and what is
    counted either way: a counted row passes when ``on_items`` holds for its item and
    ``when_true`` for itself, or when it fails and ``when_false`` holds. ``when_*`` are Qs
    relative to the counted rows, True (every row) or False (none). ``on_items``: the test's
    conditions, ``(depth, lookup, value)`` with the lookup relative to its row (depth 0: the
    item, one hop above the counted rows; 1: the row above the item, …), joined by
    ``connector``; () for none.

    ``Q(reviews__stars__gte=4, pages__gte=300)`` (an AND) is ``pages >= 300`` then
    ``stars >= 4``, else none. ``Q(reviews__stars__gte=4) | Q(pages__gte=500)`` is
    ``pages >= 500`` then every review, else those of four stars or more: the item is worth
    all its children or some of them, which keeps the count an item count. A condition on a
    row above the item (the book's shelf's name) is one more test of the item: every row on
    the path from the item up is reached by one foreign key per hop."""

    on_items: tuple[tuple[int, str, object], ...]
    connector: str
    when_true: Q | bool
    when_false: Q | bool


def split(conditions: Q, own: str, rows: list[str]) -> Split | str:
    """``conditions`` (lookups from the target) taken apart over the counted rows (prefix
    ``own``) and the rows above them (``rows``: prefixes of the item, then of each row above
    it, nearest first), or why they cannot be: a lookup on no row of the path, an ``F()``
    along the path, or conditions on those rows in more than one place of an OR or a NOT
    (each would double what the item is worth to test)."""
    whole = relative(conditions, own)
    if whole is not None:
        return Split((), Q.AND, whole, False)
    groups: list[tuple[Q, list]] = []
    for node, leaves in _item_leaves(conditions, own, rows):
        if isinstance(leaves, str):
            return leaves
        if leaves:
            groups.append((node, leaves))
    if len(groups) != 1:
        return "its filter tests the items in more than one place of an OR or a NOT"
    node, leaves = groups[0]
    on_items = []
    for lookup, value in leaves:
        depth = next(d for d, prefix in enumerate(rows) if lookup.startswith(prefix))
        on_items.append((depth, lookup[len(rows[depth]) :], value))
    either = []
    for value in (True, False):
        fixed = _fix(conditions, node, leaves, value)
        either.append(fixed if isinstance(fixed, bool) else relative(fixed, own))
    return Split(tuple(on_items), node.connector, either[0], either[1])


def _item_leaves(q: Q, own: str, rows: list[str]):
    """``(node, its leaves reading the item or a row above it)`` for each node of ``q``;
    ``(node, reason)`` for a leaf on no row of the path, or comparing with ``F()``."""
    mine = []
    for child in q.children:
        if isinstance(child, Q):
            yield from _item_leaves(child, own, rows)
            continue
        lookup, value = child
        if has_f(value):
            yield q, "its filter compares with a value reached by F() along a long path"
            return
        if lookup.startswith(own):
            continue
        if not any(lookup.startswith(prefix) for prefix in rows):
            yield q, "its filter reads rows off the path (a relation of a row above the items)"
            return
        mine.append(child)
    yield q, mine


def _fix(q: Q, node: Q, leaves: list, value: bool) -> Q | bool:
    """``q`` with the item leaves ``leaves`` of ``node`` taken together as ``value``,
    simplified: a constant where the rest no longer matters."""
    parts: list = []
    for child in q.children:
        if q is node and child in leaves:
            continue
        parts.append(_fix(child, node, leaves, value) if isinstance(child, Q) else Q(child))
    if q is node:
        parts.append(value)
    absorbing = q.connector == Q.OR  # True absorbs an OR, False an AND
    if any(p is absorbing for p in parts):
        result: Q | bool = absorbing
    else:
        rest = [p for p in parts if not isinstance(p, bool)]
        result = not absorbing if not rest else Q(*rest, _connector=q.connector)
    if q.negated:
        return (not result) if isinstance(result, bool) else ~result
    return result
