"""The engine's invariants, checked in one snapshot: a wrong ledger shows before a wrong count.

Comparing cached counts with the truth (``tests.truth``) only works at rest, once every mark is
drained, and a drift found then says nothing of when it began: a ledger credited twice stays
invisible until a drain credits the difference it holds against the next change. The engine's
correctness argument (``counts.run.items``, ``counts.run.multiplicity``) rests instead on invariants
that hold at *every* commit, marks pending or not, writers and drains running or not. This
module checks them, set-based, in one REPEATABLE READ snapshot (a separate connection), so a
test can call it in the middle of a race as well as at the end. A test whose rows live in its
own uncommitted transaction (``django_db`` without ``transaction=True``) is checked on its own
connection instead: nobody else can see, so nobody else can change, its rows.

A mark is *visible* when it is committed in the snapshot. Marks table: ``counts_dirtymark``.

- **I** (per target row T, per incremental column c: ``counts.declare.modes.incremental_columns``):
  ``stored(T.c) + Σ pending deltas of (T, c)`` equals, for a summed item count, the amounts
  its kind's ledgers credit T under the count's key; for a distinct count, T's multiplicity
  pairs with ``n > 0``; for an own-row count, ``COUNT(*)`` of the counted rows holding T's key,
  compiled by the ORM from the declaration's path and filter (not the engine's recompute
  statement, which would agree with its own mistakes). Exempt while a visible *recount* mark
  (``deltas`` and ``field`` NULL) names T or every row (``ids`` NULL). ``via:`` marks exempt
  nothing: their ids are link values of the route's first table, not target ids, and they
  are written only for counts kept in full, which I is not about.
- **J** (per item kind): an item no visible item mark or pending job mark covers
  (``counts.compile.stale_items.stale_sql``; an item mark with ``ids`` NULL covers every item, which
  ``stale_sql`` does not see; a backfill's lease, for the keys its ``payload`` names) has a
  ledger equal to its truth
  (``counts.compile.item_sql.truth_sql``,
  current keys only; no row = ``{}``); a ledger row of an item that no longer exists is kept
  only while a mark covers it.
- **M** (per distinct count): ``counts_multiplicity.n`` = the ledger entries
  ``[1, target, ..., value]`` of its key per (target, value), and no row has ``n <= 0``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import psycopg
from django.apps import apps
from django.db import connections, transaction
from django.db.models import Count, Q

from counts.apps import graph
from counts.base.names import LEDGER_TABLE, MARK_TABLE, literal, q
from counts.compile.item_sql import truth_sql
from counts.compile.stale_items import stale_sql
from counts.declare.kinds import ItemKind, Part
from counts.declare.modes import ItemCount, OwnRow, incremental_columns
from counts.run.multiplicity import TABLE as MULTIPLICITY_TABLE

#: Violations listed by :func:`assert_invariants`; the rest are counted.
SHOWN = 20


@dataclass(frozen=True)
class Violation:
    invariant: str  # "I", "J" or "M"
    where: str  # target model, item kind, or distinct count
    row: int  # target row, item, or target of a multiplicity pair
    field: str  # cached column; "ledger" / "orphan ledger" (J); "value <v>" (M)
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.where}#{self.row} {self.field}: {self.detail}"


@contextlib.contextmanager
def _snapshot(using: str):
    """A cursor whose statements all read one snapshot of the committed state."""
    conn = connections[using]
    if conn.in_atomic_block:  # the test's own transaction: see the module's docstring
        with transaction.atomic(using=using), conn.cursor() as cursor:
            # Unanalysed tables make every check look huge to the planner, and JIT-compiling
            # them costs more than running them.
            cursor.execute("SET LOCAL jit = off")
            yield cursor
        return
    db = conn.settings_dict
    with psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname=db["NAME"],
        cursor_factory=psycopg.ClientCursor,  # %s parameters, as Django's compiler writes them
    ) as pg:
        pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        pg.read_only = True
        try:
            with pg.cursor() as cursor:
                cursor.execute("SET LOCAL jit = off")
                yield cursor
        finally:
            pg.rollback()


def violations(using: str = "default") -> list[Violation]:
    """Every violation of I, J and M in one snapshot of ``using``'s database."""
    g = graph()
    kinds = g.kinds
    with _snapshot(using) as cursor:
        found = _check_i(cursor, g, kinds, using)
        for kind in kinds.values():
            found += _check_j(cursor, kind)
            found += [v for p in kind.parts if p.distinct for v in _check_m(cursor, kind, p)]
    return found


def assert_invariants(using: str = "default") -> None:
    """Fail listing (up to :data:`SHOWN` of) the violations of I, J and M."""
    found = violations(using)
    more = f"\n... and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    assert not found, (
        f"{len(found)} engine invariant violations:\n"
        + "\n".join(str(v) for v in found[:SHOWN])
        + more
    )


# --- I ----------------------------------------------------------------------------------------


def _check_i(cursor, g, kinds: dict[str, ItemKind], using: str) -> list[Violation]:
    parts = {(p.label, p.column): (k, p) for k in kinds.values() for p in k.parts}
    specs = {(s.target.label, s.column): s for s in g.specs}
    found = []
    for label, columns in sorted(incremental_columns(g).items()):
        for column in sorted(columns):
            spec = specs[(label, column)]
            params: list = []
            if isinstance(spec.mode, OwnRow):
                expected, params = _own_row_sql(spec, using)
                source = "counted rows"
            elif not isinstance(spec.mode, ItemCount):
                raise AssertionError(f"{label}.{column}: incremental but neither mode")
            else:
                kind, part = parts[(label, column)]
                expected, source = _item_count_sql(kind, part)
            t = spec.target
            cursor.execute(
                f"WITH pending AS (SELECT u.id, sum(u.d)::bigint AS d FROM {MARK_TABLE} m"
                " CROSS JOIN LATERAL unnest(m.ids, m.deltas) AS u(id, d)"
                f" WHERE m.target = {literal(label)} AND m.field = {literal(column)}"
                " AND m.deltas IS NOT NULL GROUP BY u.id),"
                f" expected AS ({expected}),"
                f" recount AS (SELECT m.ids FROM {MARK_TABLE} m WHERE m.target = {literal(label)}"
                " AND m.deltas IS NULL AND m.field IS NULL)"
                f" SELECT t.{q(t.pk)}, t.{q(column)}, coalesce(p.d, 0), coalesce(e.n, 0)"
                f" FROM {q(t.db_table)} t LEFT JOIN pending p ON p.id = t.{q(t.pk)}"
                f" LEFT JOIN expected e ON e.id = t.{q(t.pk)}"
                f" WHERE t.{q(column)} + coalesce(p.d, 0) <> coalesce(e.n, 0)"
                " AND NOT EXISTS (SELECT 1 FROM recount r"
                f"  WHERE r.ids IS NULL OR t.{q(t.pk)} = ANY(r.ids))"
                f" ORDER BY t.{q(t.pk)}",
                params or None,
            )
            for pk, stored, pending, want in cursor.fetchall():
                detail = (
                    f"stored {stored} + pending {pending} = {stored + pending},"
                    f" expected {want} ({source})"
                )
                found.append(Violation("I", label, pk, column, detail))
    return found


def _item_count_sql(kind: ItemKind, part: Part) -> tuple[str, str]:
    """``SELECT id, n``: what the ledgers (or, distinct, the multiplicities) say T holds."""
    key = literal(part.key)
    if part.distinct:
        return (
            f"SELECT target_id AS id, count(*) AS n FROM {MULTIPLICITY_TABLE}"
            f" WHERE key = {key} AND n > 0 GROUP BY 1"
        ), "multiplicity pairs with n > 0"
    return (
        f"SELECT t::bigint AS id, sum((l.state->{key}->>0)::bigint) AS n FROM {LEDGER_TABLE} l"
        f" CROSS JOIN LATERAL jsonb_array_elements_text((l.state->{key}) - 0) t"
        f" WHERE l.kind = {literal(kind.mark_target)} AND l.state ? {key} GROUP BY 1"
    ), f"credited by the ledgers of {kind.mark_target}"


def _relative(conditions: Q, prefix: str) -> Q:
    """The conditions with ``prefix`` stripped from every lookup."""
    children = [
        _relative(c, prefix) if isinstance(c, Q) else (c[0].removeprefix(prefix), c[1])
        for c in conditions.children
    ]
    return Q(*children, _connector=conditions.connector, _negated=conditions.negated)


def _own_row_sql(spec, using: str) -> tuple[str, list]:
    """``SELECT id, n``: ``COUNT(*)`` of the counted rows per target key, by the ORM from the
    declaration: the rows across the path's first (reverse) hop — the counted rows, or an
    M2M's through rows — filtered by the declaration's filter, relative to them."""
    hop = spec.path_chain[0]
    model = apps.get_model(hop.child.label)
    fk = next(f.attname for f in model._meta.concrete_fields if f.column == hop.column)
    rows = model._base_manager.filter(**{f"{fk}__isnull": False})
    if spec.filter is not None:
        rows = rows.filter(_relative(spec.filter, spec.path + "__"))
    rows = rows.order_by().values(fk).annotate(n=Count("*"))
    sql, params = rows.query.get_compiler(using=using).as_sql()
    return f"SELECT o.id, o.n FROM ({sql}) o(id, n)", list(params)


# --- J ----------------------------------------------------------------------------------------


def _check_j(cursor, kind: ItemKind) -> list[Violation]:
    k, t = literal(kind.mark_target), kind.table
    cursor.execute(
        f"SELECT payload FROM {MARK_TABLE} WHERE target = {k} AND field IS NULL AND ids IS NULL"
    )
    payloads = [json.loads(p) if isinstance(p, str) else p for (p,) in cursor.fetchall()]
    if any(p is None for p in payloads):
        return []  # every item is marked: any ledger may lag
    # A backfill's lease names the keys whose entries may lag; every other entry must not.
    lagging = {key for p in payloads for key in p["keys"]}
    kept = [p.key for p in kind.parts if p.key not in lagging]
    keys = f"ARRAY[{', '.join(literal(key) for key in kept)}]::text[]"
    stale = stale_sql(kind, keys=kept)

    def covered(item: str) -> str:
        return f"EXISTS (SELECT 1 FROM ({stale}) s WHERE s.id = {item})"

    def current(state: str) -> str:
        return (
            f"coalesce((SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each({state}) e"
            f" WHERE e.key = ANY({keys})), '{{}}')"
        )

    items = f"(SELECT {q(t.pk)} AS id FROM {q(t.db_table)})"
    cursor.execute(
        f"SELECT t.id, {current('l.state')}, {current('t.state')}"
        f" FROM ({truth_sql(kind, items)}) t"
        f" LEFT JOIN {LEDGER_TABLE} l ON l.kind = {k} AND l.item_id = t.id"
        f" WHERE {current('l.state')} IS DISTINCT FROM {current('t.state')}"
        f" AND NOT {covered('t.id')} ORDER BY t.id"
    )
    found = [
        Violation("J", kind.mark_target, pk, "ledger", f"ledger {ledger} != truth {truth}")
        for pk, ledger, truth in cursor.fetchall()
    ]
    cursor.execute(
        f"SELECT l.item_id, l.state FROM {LEDGER_TABLE} l WHERE l.kind = {k}"
        f" AND NOT EXISTS (SELECT 1 FROM {q(t.db_table)} i WHERE i.{q(t.pk)} = l.item_id)"
        f" AND NOT {covered('l.item_id')} ORDER BY l.item_id"
    )
    found += [
        Violation("J", kind.mark_target, pk, "orphan ledger", f"{state}: item gone, no mark")
        for pk, state in cursor.fetchall()
    ]
    return found


# --- M ----------------------------------------------------------------------------------------


def _check_m(cursor, kind: ItemKind, part: Part) -> list[Violation]:
    key = literal(part.key)
    cursor.execute(
        f"WITH want AS (SELECT t::bigint AS target_id,"
        f" (l.state->{key}->>-1)::bigint AS value, sum((l.state->{key}->>0)::bigint) AS n"
        f" FROM {LEDGER_TABLE} l"
        f" CROSS JOIN LATERAL jsonb_array_elements_text((l.state->{key}) - 0 - -1) t"
        f" WHERE l.kind = {literal(kind.mark_target)} AND l.state ? {key}"
        " GROUP BY 1, 2),"
        f" have AS (SELECT target_id, value, n FROM {MULTIPLICITY_TABLE} WHERE key = {key})"
        " SELECT coalesce(w.target_id, h.target_id), coalesce(w.value, h.value), h.n, w.n"
        " FROM want w FULL JOIN have h ON h.target_id = w.target_id AND h.value = w.value"
        " WHERE coalesce(h.n, 0) <> coalesce(w.n, 0) OR h.n <= 0 ORDER BY 1, 2"
    )
    where = f"{part.label}.{part.column} [{part.key}]"
    return [
        Violation("M", where, target, f"value {value}", f"n = {n}, ledger entries {want or 0}")
        for target, value, n, want in cursor.fetchall()
    ]
