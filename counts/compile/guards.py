"""The engine owns its columns: guard triggers on every table that holds cached counts.

A cached column is written by ``Model.save()`` like any other column, so without a guard a
stale instance (loaded before a drain recomputed the row, then renamed and saved by an admin
form, a DRF update or a long ML job) silently puts the old counts back, and no trigger marks
anything because no counted row changed. So does ``bulk_update()``, ``queryset.update()`` and
raw SQL from any client. Leaving the columns out of ``save()`` would cover only the first.

Two triggers per target table close every path, in the database where no client can miss them:

- ``counts_own_<table>``: ``BEFORE UPDATE FOR EACH ROW``, fired (``WHEN``) only when an update
  changes a cached column or ``counts_updated_at``; unless the transaction-local setting
  :data:`ENGINE_SETTING` is on, it keeps the old values. The rest of the update (the rename)
  goes through. Only the engine's recompute transactions turn the setting on
  (``counts.run.engine_transaction``).
- ``counts_made_<table>``: ``AFTER INSERT FOR EACH ROW``, fired only for a row inserted with
  made-up counts (any cached column non-zero, or a freshness time); it marks the row, so a
  drain recounts it. Rows inserted the ordinary way (defaults of 0) cost nothing.

A third, ``counts_key_<table>`` (``BEFORE UPDATE OF`` the primary key), refuses to change the
primary key of a row the engine keeps state under — a target (its stored counts, marks and
multiplicities name it), an item (its ledger), a row a setting is reached through (job marks):
renumbering a night and re-pointing its captures in one transaction would otherwise carry the
night's stored counts to the new id *and* credit the captures to it again. Nothing else
updates a primary key, so the ordinary write path never fires it.

Row-level triggers with ``WHEN`` clauses: PostgreSQL evaluates the condition without calling
the function, so the ordinary write path pays only for a comparison per row.

Restores and ``session_replication_role = replica`` switch triggers off, guards included; that
drift is what ``counts reconcile`` is for.
"""

from __future__ import annotations

from counts.base.names import ENGINE_SETTING, FRESHNESS_FIELD, MARK_TABLE, literal, q
from counts.compile.compiled import CompiledTrigger, object_name

#: Operations of the guard triggers, in the order they are compiled.
GUARD_OPERATIONS = ("own", "made", "key")


def _install(name: str, table: str, timing: str, when: str, body: str) -> str:
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $counts$\n"
        f"BEGIN\n{body}\nEND;\n$counts$;\n"
        f"DROP TRIGGER IF EXISTS {name} ON {q(table)};\n"
        f"CREATE TRIGGER {name} {timing} ON {q(table)} FOR EACH ROW WHEN ({when})"
        f" EXECUTE FUNCTION {name}();"
    )


def keep_columns(table: str, columns: list[str]) -> CompiledTrigger:
    """``BEFORE UPDATE``: cached columns keep their old values unless the engine writes."""
    name = object_name(table, "own")
    guarded = [*columns, FRESHNESS_FIELD]
    when = " OR ".join(f"OLD.{q(c)} IS DISTINCT FROM NEW.{q(c)}" for c in guarded)
    restore = "\n".join(f"  NEW.{q(c)} := OLD.{q(c)};" for c in guarded)
    body = (
        f"IF current_setting({literal(ENGINE_SETTING)}, true) IS DISTINCT FROM 'on' THEN\n"
        f"{restore}\nEND IF;\nRETURN NEW;"
    )
    return CompiledTrigger(name, table, "own", _install(name, table, "BEFORE UPDATE", when, body))


def mark_made_up(label: str, table: str, pk: str, columns: list[str]) -> CompiledTrigger:
    """``AFTER INSERT``: a row inserted with counts other than the defaults is marked."""
    name = object_name(table, "made")
    when = " OR ".join(
        [f"NEW.{q(c)} IS DISTINCT FROM 0" for c in columns]
        + [f"NEW.{q(FRESHNESS_FIELD)} IS NOT NULL"]
    )
    body = (
        f"INSERT INTO {MARK_TABLE} (target, ids) VALUES ({literal(label)}, ARRAY[NEW.{q(pk)}]);\n"
        "RETURN NULL;"
    )
    return CompiledTrigger(name, table, "made", _install(name, table, "AFTER INSERT", when, body))


def keep_key(table: str, pk: str) -> CompiledTrigger:
    """``BEFORE UPDATE OF`` the primary key: refused, with what to do instead."""
    name = object_name(table, "key")
    body = (
        "RAISE EXCEPTION USING ERRCODE = 'feature_not_supported',"
        f" MESSAGE = format('counts: the primary key of %s cannot change (%s to %s):"
        " cached counts, their marks and ledgers refer to the row by it', TG_TABLE_NAME,"
        f" OLD.{q(pk)}, NEW.{q(pk)}),"
        " HINT = 'Insert a new row and move the related rows to it, then delete the old one.';"
    )
    timing = f"BEFORE UPDATE OF {q(pk)}"
    when = f"OLD.{q(pk)} IS DISTINCT FROM NEW.{q(pk)}"
    return CompiledTrigger(name, table, "key", _install(name, table, timing, when, body))


def keyed_tables(graph) -> dict[str, str]:
    """``{table: pk}`` of the rows the engine keeps state under: targets, items, the rows on
    the way to a setting, and link rows named by id."""
    tables = {t.db_table: t.pk for t in graph.targets.values()}
    for spec in graph.specs:
        mode = spec.mode
        kind = getattr(mode, "kind", None)
        if kind is not None:
            tables[kind.db_table] = kind.pk
        for watched in filter(
            None, (getattr(mode, "setting", None), *getattr(mode, "watches", ()))
        ):
            for hop in watched.hops:
                tables[hop.child.db_table] = hop.child.pk
    # A link job whose marks name its rows by id (a station, for its project's taxa).
    for job in graph.jobs:
        if job.values == job.table.pk:
            tables[job.table.db_table] = job.table.pk
    return tables


def compile_guards(graph) -> list[CompiledTrigger]:
    """The guards of every table holding cached counts, then the key guards, in a stable
    order."""
    compiled = []
    for label, table in sorted(graph.targets.items()):
        columns = [s.column for s in graph.specs if s.target == table]
        compiled.append(keep_columns(table.db_table, columns))
        compiled.append(mark_made_up(label, table.db_table, table.pk, columns))
    compiled += [keep_key(table, pk) for table, pk in sorted(keyed_tables(graph).items())]
    return compiled
