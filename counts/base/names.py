"""The names the engine gives things in the database, and how SQL text quotes them.

One place below every other module: what a declaration, a trigger, a check, a drain and a
migration must agree on.
"""

import datetime
import decimal

#: The dirty-mark queue (``counts.models.DirtyMark``): what triggers write and drains take.
MARK_TABLE = "counts_dirtymark"
#: The items' ledgers (``counts.models.Ledger``): what each item last credited to its targets.
LEDGER_TABLE = "counts_ledger"
#: Per distinct count, target and value: how many items' ledgers credit the pair.
MULTIPLICITY_TABLE = "counts_multiplicity"
#: Transaction-local setting under which cached columns may change (``set_config(..., true)``).
ENGINE_SETTING = "counts.engine"
#: Statement kinds a table can see, as trigger events name them, in the order triggers are
#: compiled.
OPERATIONS = ("insert", "update", "delete", "truncate")

#: The column every model with cached counts gets: when its counts last changed.
FRESHNESS_FIELD = "counts_updated_at"
#: Set on ``CachedCountField`` (and nothing else): how a module that must not import the
#: field's class (``counts.declare.checks``, which the field's own ``check()`` calls) finds counts.
CACHED_COUNT_MARKER = "is_cached_count"


def count_fields(model) -> list:
    """The model's cached-count fields, in declaration order."""
    return [f for f in model._meta.concrete_fields if getattr(f, CACHED_COUNT_MARKER, False)]


def q(identifier: str) -> str:
    """Quote an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_value(value) -> str:
    """A Python value written into SQL text: what a trigger compares a row with."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float | decimal.Decimal):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str | datetime.date | datetime.datetime):
        return "'" + str(value).replace("'", "''") + "'"
    raise ValueError(f"cannot inline {type(value).__name__}")
