"""What a dirty mark means: its kind, decoded in one place, and one SQL fragment per kind.

A mark is a row of ``counts_dirtymark`` (``counts.models.DirtyMark``). Its columns say what it
asks for; this module is the only place that reads them to tell which kind it is, so a reader
of the queue (a drain, a recount's formula, freshness flags, the stale items, a test) never
decodes a prefix of its own:

=============  ==============================  ============================================
kind           columns                         asks for
=============  ==============================  ============================================
DELTA          ``deltas`` set, ``field`` col   add ``deltas[k]`` to ``field`` of ``ids[k]``
RECOUNT        model target, ``ids``           recount these rows in full
EVERY_ROW      model target, ``ids`` NULL      recount every row (TRUNCATE, a lapsed lease)
ROUTE          ``field`` ``via:<hash>``        recount what rows of a route's first table
                                               reach (``counts.run.routes``)
ITEM           ``item:<label>``, ``ids``       these items may contribute differently now
EVERY_ITEM     ``item:<label>``, ``ids`` NULL  every item may (TRUNCATE); a backfill's lease
                                               names the keys it may in ``payload``
JOB            ``field`` ``job:<hash>``        rows a setting or link changed on: expand
                                               into the items they reach (``counts.declare.jobs``)
=============  ==============================  ============================================

Any mark may carry ``not_before``: it is due only then (a row someone held, a lease).
This module imports nothing from the rest of the engine: every layer may use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The marks table.
TABLE = "counts_dirtymark"
#: ``target`` of the marks of an item kind: ``item:<label of the item table>``.
ITEM_PREFIX = "item:"
#: ``field`` of a job mark: ``job:<hash of the job's shape>``.
JOB_PREFIX = "job:"
#: ``field`` of a route mark: ``via:<hash of the route>``.
ROUTE_PREFIX = "via:"


class Kind(enum.StrEnum):
    DELTA = "delta"
    RECOUNT = "recount"
    EVERY_ROW = "every row"
    ROUTE = "route"
    ITEM = "item"
    EVERY_ITEM = "every item"
    JOB = "job"


def kind_of(target: str, ids, field: str | None, deltas) -> Kind:
    """The kind of a mark with these columns."""
    if target.startswith(ITEM_PREFIX):
        if field is not None and field.startswith(JOB_PREFIX):
            return Kind.JOB
        return Kind.EVERY_ITEM if ids is None else Kind.ITEM
    if deltas is not None:
        return Kind.DELTA
    if field is not None and field.startswith(ROUTE_PREFIX):
        return Kind.ROUTE
    return Kind.EVERY_ROW if ids is None else Kind.RECOUNT


def where(kind: Kind, alias: str | None = "m") -> str:
    """SQL: the mark ``alias`` (a row of :data:`TABLE`; None: unqualified columns) is of
    ``kind``. Exactly the cases of :func:`kind_of`."""
    a = f"{alias}." if alias else ""
    item = f"starts_with({a}target, '{ITEM_PREFIX}')"
    job = f"coalesce(starts_with({a}field, '{JOB_PREFIX}'), false)"
    route = f"coalesce(starts_with({a}field, '{ROUTE_PREFIX}'), false)"
    return {
        Kind.JOB: f"({item} AND {job})",
        Kind.ITEM: f"({item} AND NOT {job} AND {a}ids IS NOT NULL)",
        Kind.EVERY_ITEM: f"({item} AND NOT {job} AND {a}ids IS NULL)",
        Kind.DELTA: f"(NOT {item} AND {a}deltas IS NOT NULL)",
        Kind.ROUTE: f"(NOT {item} AND {a}deltas IS NULL AND {route})",
        Kind.RECOUNT: f"(NOT {item} AND {a}deltas IS NULL AND NOT {route} AND {a}ids IS NOT NULL)",
        Kind.EVERY_ROW: f"(NOT {item} AND {a}deltas IS NULL AND NOT {route} AND {a}ids IS NULL)",
    }[kind]


@dataclass(frozen=True)
class Mark:
    """One mark, as read from the queue or about to be written to it."""

    target: str
    ids: tuple[int, ...] | None = None
    field: str | None = None
    deltas: tuple[int, ...] | None = None
    payload: object = None
    id: int | None = None

    @property
    def kind(self) -> Kind:
        return kind_of(self.target, self.ids, self.field, self.deltas)

    @classmethod
    def from_row(cls, id_, target, ids, field, deltas, payload=None) -> Mark:
        """A row read as ``id, target, ids, field, deltas, payload``."""
        return cls(
            target,
            None if ids is None else tuple(ids),
            field,
            None if deltas is None else tuple(deltas),
            payload,
            id_,
        )

    # What writers of marks build (the triggers write theirs in SQL, the same columns).
    @classmethod
    def delta(cls, label: str, column: str, amounts: dict[int, int]) -> Mark:
        ids = tuple(sorted(amounts))
        return cls(label, ids, column, tuple(amounts[i] for i in ids))

    @classmethod
    def recount(cls, label: str, ids) -> Mark:
        return cls(label, tuple(sorted(set(ids))))

    @classmethod
    def every_row(cls, label: str) -> Mark:
        return cls(label)

    @classmethod
    def item(cls, kind: str, ids) -> Mark:
        return cls(kind, tuple(sorted(set(ids))))

    @classmethod
    def every_item(cls, kind: str) -> Mark:
        return cls(kind)

    def insert(self, cursor, due_in_s: float | None = None) -> int:
        """Write this mark (due in ``due_in_s`` seconds, or now); returns its id."""
        cursor.execute(
            f"INSERT INTO {TABLE} (target, ids, field, deltas, not_before)"
            " VALUES (%s, %s, %s, %s,"
            " CASE WHEN %s::float8 IS NULL THEN NULL"
            " ELSE now() + make_interval(secs => %s::float8) END) RETURNING id",
            [
                self.target,
                None if self.ids is None else list(self.ids),
                self.field,
                None if self.deltas is None else list(self.deltas),
                due_in_s,
                due_in_s,
            ],
        )
        return cursor.fetchone()[0]
