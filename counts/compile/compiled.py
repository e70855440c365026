"""A compiled trigger: its SQL, its name, the hash that tells an installed one from an outdated
one, and the table lock installing it takes.

Shared by the mark triggers (``counts.compile.triggers``), the guards
(``counts.compile.guards``), migrations and ``counts status``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from counts.base.names import literal, q

#: Table locks, weakest first: what ``CREATE [OR REPLACE] TRIGGER`` takes (writers wait, readers
#: do not), and what ``DROP TRIGGER`` takes (everyone waits).
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"


ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"


_SHORT = {
    "insert": "ins",
    "update": "upd",
    "delete": "del",
    "truncate": "trunc",
    "own": "own",
    "made": "made",
    "key": "key",
}


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
        """``sql`` with its trigger replaced in place, then the comment carrying ``hash``.

        ``sql`` (what migrations store, and what ``hash`` covers) drops the trigger and creates
        it again; ``DROP TRIGGER`` takes an ``ACCESS EXCLUSIVE`` lock on the table, which waits
        for every open reader and queues every later one behind it. ``CREATE OR REPLACE
        TRIGGER`` (PostgreSQL 14) takes ``SHARE ROW EXCLUSIVE``, which readers never wait for,
        and is as idempotent: installing a trigger that is there already replaces it.
        """
        drop_create = (
            f"DROP TRIGGER IF EXISTS {self.name} ON {q(self.table)};\nCREATE TRIGGER {self.name} "
        )
        sql = self.sql.replace(drop_create, f"CREATE OR REPLACE TRIGGER {self.name} ", 1)
        return f"{sql}\nCOMMENT ON TRIGGER {self.name} ON {q(self.table)} IS {literal(self.hash)};"

    @property
    def install_lock(self) -> str:
        """The table lock ``install_sql`` needs (``counts.operations`` takes it up front)."""
        return ACCESS_EXCLUSIVE if "DROP TRIGGER" in self.install_sql else SHARE_ROW_EXCLUSIVE

    @property
    def uninstall_sql(self) -> str:
        """Drop the trigger and its function; nothing to drop is no error (idempotent)."""
        return (
            f"DROP TRIGGER IF EXISTS {self.name} ON {q(self.table)};\n"
            f"DROP FUNCTION IF EXISTS {self.name}();"
        )

    #: The table lock ``uninstall_sql`` needs: ``DROP TRIGGER`` takes ``ACCESS EXCLUSIVE``.
    uninstall_lock = ACCESS_EXCLUSIVE

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "table": self.table,
            "operation": self.operation,
            "sql": self.sql,
        }


def object_name(table: str, operation: str) -> str:
    """Predictable trigger/function name under PostgreSQL's 63-character limit."""
    name = f"counts_{_SHORT[operation]}_{table}"
    if len(name) > 63:
        digest = hashlib.sha1(table.encode()).hexdigest()[:8]
        name = f"{name[:54]}_{digest}"
    return name.lower()
