"""Compile the dependency graph into PostgreSQL statement-level triggers.

Every function here is pure: graph in, SQL text out. Tests assert the text; migrations store it;
``counts status`` compares the hash stored in ``COMMENT ON TRIGGER`` with the compiled one.

Shape of the generated code, per watched table and operation (one trigger per operation: a
trigger with transition tables may serve only one event, and may not use ``UPDATE OF``):

- ``AFTER INSERT`` / ``AFTER DELETE`` read ``new_rows`` / ``old_rows``; ``AFTER UPDATE`` keeps
  only rows whose read columns changed, from both sides, so a moved detection dirties the old
  image's targets and the new one's; ``AFTER TRUNCATE`` marks every row of each target.
- Each route is walked from the changed rows up to the target ids with one indexed probe per
  hop, ids carried in arrays (``= ANY(ids)``) rather than joining the transition table to a
  large table, which can plan as a sequential scan.
- One ``counts_dirtymark`` row per target model per statement, however many rows changed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from counts.graph import ROOT, Graph, Route
from counts.spec import REVERSE, Table

#: Table the triggers write to (``counts.models.DirtyMark``).
MARK_TABLE = "counts_dirtymark"
#: Operations, in the order triggers are compiled.
OPERATIONS = ("insert", "update", "delete", "truncate")
_SHORT = {"insert": "ins", "update": "upd", "delete": "del", "truncate": "trunc"}


@dataclass(frozen=True)
class CompiledTrigger:
    """One trigger and its function, ready to install or compare.

    ``sql`` creates the function and the trigger; ``install_sql`` adds the comment carrying
    ``hash``, which is how an installed trigger is told apart from an outdated one.
    """

    name: str
    table: str
    operation: str
    sql: str

    @property
    def hash(self) -> str:
        return hashlib.sha1(self.sql.encode()).hexdigest()

    @property
    def install_sql(self) -> str:
        return (
            f"{self.sql}\nCOMMENT ON TRIGGER {self.name} ON {q(self.table)}"
            f" IS {literal(self.hash)};"
        )

    @property
    def uninstall_sql(self) -> str:
        return (
            f"DROP TRIGGER IF EXISTS {self.name} ON {q(self.table)};\n"
            f"DROP FUNCTION IF EXISTS {self.name}();"
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "table": self.table,
            "operation": self.operation,
            "sql": self.sql,
        }


def q(identifier: str) -> str:
    """Quote an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def object_name(table: str, operation: str) -> str:
    """Predictable trigger/function name under PostgreSQL's 63-character limit."""
    name = f"counts_{_SHORT[operation]}_{table}"
    if len(name) > 63:
        digest = hashlib.sha1(table.encode()).hexdigest()[:8]
        name = f"{name[:54]}_{digest}"
    return name.lower()


def _changed_rows(table: Table, columns: frozenset[str], side: str) -> str:
    """Rows of one transition table whose read columns differ on the other side."""
    this, other = ("old_rows", "new_rows") if side == "old" else ("new_rows", "old_rows")
    same = " AND ".join(
        [f"o.{q(table.pk)} = s.{q(table.pk)}"]
        + [f"o.{q(c)} IS NOT DISTINCT FROM s.{q(c)}" for c in sorted(columns)]
    )
    return f"(SELECT s.* FROM {this} s WHERE NOT EXISTS (SELECT 1 FROM {other} o WHERE {same}))"


def walk_sql(route: Route, source: str) -> tuple[str, list[str]]:
    """How to reach target ids from rows of ``source``: a first query, then probe statements.

    ``source`` is a relation of rows of ``route.table`` (a transition table or a subquery of
    one). The first query reads ``source`` and yields an id array; each probe statement moves
    ``_ids`` one hop up. ``_ids`` ends NULL when nothing is reached: every later probe then
    finds nothing. First queries are returned apart so that routes sharing one read the
    transition table once.
    """
    steps: list[str] = []
    chain = route.chain
    if route.reached_by == ROOT:
        held_table, held_column = route.target, route.target.pk
        steps.append(f"SELECT array_agg(DISTINCT src.{q(held_column)}) FROM {source} src")
    else:
        last = chain[-1]
        if last.kind == REVERSE:
            held_table, held_column = last.parent, last.parent.pk
            steps.append(
                f"SELECT array_agg(DISTINCT src.{q(last.column)}) FROM {source} src"
                f" WHERE src.{q(last.column)} IS NOT NULL"
            )
        else:
            held_table, held_column = last.parent, last.column
            steps.append(f"SELECT array_agg(DISTINCT src.{q(last.child.pk)}) FROM {source} src")
        for hop in reversed(chain[:-1]):
            # We hold values of ``held_column`` on rows of hop.child; step to hop.parent.
            child = hop.child
            if hop.kind == REVERSE:
                steps.append(_probe(child, hop.column, held_column))
                held_table, held_column = hop.parent, hop.parent.pk
            else:
                if held_column != child.pk:
                    steps.append(_probe(child, child.pk, held_column))
                held_table, held_column = hop.parent, hop.column
    if held_column != held_table.pk:
        steps.append(_probe(held_table, held_table.pk, held_column))
    return steps[0], steps[1:]


def _probe(table: Table, select: str, where: str) -> str:
    return (
        f"SELECT array_agg(DISTINCT t.{q(select)}) INTO _ids FROM {q(table.db_table)} t"
        f" WHERE t.{q(where)} = ANY(_ids) AND t.{q(select)} IS NOT NULL;"
    )


def _routes_for(routes: tuple[Route, ...], operation: str) -> list[Route]:
    if operation in ("insert", "delete"):
        return [r for r in routes if r.on_insert_delete]
    if operation == "update":
        return [r for r in routes if r.on_update]
    return [r for r in routes if r.on_insert_delete or r.on_update]


def function_body(routes: list[Route], operation: str) -> str:
    """The PL/pgSQL between BEGIN and END for one table and operation."""
    targets = sorted({r.target.label for r in routes})
    acc = {label: f"_acc{i}" for i, label in enumerate(targets)}
    lines: list[str] = []
    firsts: dict[str, str] = {}  # first query -> variable holding its result
    if operation == "truncate":
        for label in targets:
            lines.append(f"INSERT INTO {MARK_TABLE} (target, ids) VALUES ({literal(label)}, NULL);")
        return "\n".join([*lines, "RETURN NULL;"])
    for route in routes:
        path = " > ".join([route.target.label] + [h.child.db_table for h in route.chain])
        lines.append(f"-- {path}")
        if operation == "update":
            sources = [_changed_rows(route.table, route.columns, s) for s in ("old", "new")]
        else:
            sources = ["new_rows" if operation == "insert" else "old_rows"]
        for source in sources:
            first, probes = walk_sql(route, source)
            if first not in firsts:
                firsts[first] = f"_src{len(firsts)}"
                lines.append(f"{firsts[first]} := ({first});")
            lines.append(f"_ids := {firsts[first]};")
            lines.extend(probes)
            lines.append(f"{acc[route.target.label]} := {acc[route.target.label]} || _ids;")
    return "\n".join([*lines, *_flush(acc)])


def _flush(acc: dict[str, str]) -> list[str]:
    """One mark per target model: the union of every route's ids."""
    lines = []
    for label, a in acc.items():
        lines.append(
            f"IF cardinality({a}) > 0 THEN INSERT INTO {MARK_TABLE} (target, ids)"
            f" SELECT {literal(label)}, array_agg(DISTINCT x ORDER BY x) FROM unnest({a}) x;"
            " END IF;"
        )
    return [*lines, "RETURN NULL;"]


def compile_trigger(table: Table, routes: tuple[Route, ...], operation: str):
    """Install SQL for one table and operation, or None when no route needs it."""
    chosen = _routes_for(routes, operation)
    if not chosen:
        return None
    name = object_name(table.db_table, operation)
    targets = sorted({r.target.label for r in chosen})
    declare = ["_ids bigint[];"] + [f"_acc{i} bigint[] := '{{}}';" for i in range(len(targets))]
    if operation == "truncate":
        declare = []
        referencing = ""
    elif operation == "update":
        referencing = "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    elif operation == "insert":
        referencing = "REFERENCING NEW TABLE AS new_rows"
    else:
        referencing = "REFERENCING OLD TABLE AS old_rows"
    body = function_body(chosen, operation)
    declare += [f"{v} bigint[];" for v in sorted(set(re.findall(r"\b_src\d+\b", body)))]
    declare_sql = ("DECLARE\n" + "\n".join(declare) + "\n") if declare else ""
    install = (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $counts$\n"
        f"{declare_sql}BEGIN\n{body}\nEND;\n$counts$;\n"
        f"DROP TRIGGER IF EXISTS {name} ON {q(table.db_table)};\n"
        f"CREATE TRIGGER {name} AFTER {operation.upper()} ON {q(table.db_table)}"
        f"{' ' + referencing if referencing else ''} FOR EACH STATEMENT EXECUTE FUNCTION {name}();"
    )
    return CompiledTrigger(name, table.db_table, operation, install)


def compile_triggers(graph: Graph) -> list[CompiledTrigger]:
    """Every trigger the graph needs, in a stable order."""
    compiled = []
    for _db_table, routes in graph.routes.items():
        table = routes[0].table
        for operation in OPERATIONS:
            trigger = compile_trigger(table, routes, operation)
            if trigger is not None:
                compiled.append(trigger)
    return compiled
