"""Server-side prepared statements, with generic plans, for a drain's hot statements.

A small drain (one detection: take the mark, lock the item, read its truth and write its
ledger, add the credits) runs four statements whose execution takes about 0.8 ms in all at
10⁶ captures, but whose parsing and planning took twice that: each is a CTE of a few
kilobytes, and Django's default cursor binds parameters on the client, so the server parses
and plans every one afresh. Their shapes are fixed (the SQL depends only on the declarations;
ids travel as arrays), so a plan made once per connection serves every batch. Measured side by
side on one statement (the item recompute): 1.2 ms as sent by Django, 0.45 ms prepared with
a generic plan.

Why a *generic* plan, and forced: for a small batch the plan is index probes per id
(``= ANY(array)`` on a primary key, ``unnest(array)`` joined to indexes), which is what a
generic estimate picks. Left to itself, PostgreSQL compares the generic plan's cost, estimated
for an array of unknown length, with the custom plans' cost for the one-element arrays of
small drains, and keeps planning custom plans. A batch of more than :data:`GENERIC_MAX_IDS`
ids is planned for its own ids, as before: there the generic guess can be far off, and the
planning is a small part of the batch's cost. The take statement, whose size is not known
before it runs, is prepared without forcing (it runs before the engine's settings), and
PostgreSQL's own choice between its plans stands.

What it takes, and what it leaves alone:

- Django (``psycopg`` 3) turns prepared statements off (``prepare_threshold = None``, for
  connection poolers). A connection left that way gets a threshold no statement reaches, so
  only the statements run here, with ``prepare=True``, are prepared; every other query keeps
  Django's behaviour. Behind a pooler that cannot keep prepared statements (PgBouncer in
  transaction mode before 1.21), set ``COUNTS_PREPARED_STATEMENTS = False``.
- ``plan_cache_mode = force_generic_plan`` is set for the engine's transaction only
  (``counts.run.engine_transaction``), and only when Django binds parameters on the client
  (its default): then no other statement of that transaction sends parameters to the server,
  so the setting reaches these statements and nothing else. With ``server_side_binding`` the
  statements are still prepared (no parse), and PostgreSQL chooses their plans as usual.
- Statements run through Django's cursor wrapper: execute wrappers and ``DEBUG`` query logging
  see them as any other.
"""

from __future__ import annotations

from django.conf import settings
from django.db import connections

try:
    import psycopg
except ImportError:  # psycopg2: statements run as before
    psycopg = None

#: The ``prepare_threshold`` given to a connection that has none: no statement is executed
#: that many times, so only explicit ``prepare=True`` statements are prepared.
EXPLICIT_ONLY = 2**62


def enabled() -> bool:
    return getattr(settings, "COUNTS_PREPARED_STATEMENTS", True)


def generic_plans(using: str = "default") -> bool:
    """Whether the engine's transaction may force generic plans (see the module docstring)."""
    options = connections[using].settings_dict.get("OPTIONS", {})
    return enabled() and psycopg is not None and options.get("server_side_binding") is not True


if psycopg is not None:
    from psycopg.types.numeric import Int8Dumper

    class _PreparingCursor(psycopg.Cursor):
        """A server-side binding cursor whose every statement is prepared.

        Integers go as ``bigint`` whatever their size: psycopg would otherwise send the
        smallest type that holds them, and each mix of types is a statement of its own to
        prepare and plan (a station's id is a ``smallint``, a capture's an ``integer``).
        """

        def __init__(self, connection) -> None:
            super().__init__(connection)
            self.adapters.register_dumper(int, Int8Dumper)

        def execute(self, query, params=None, *, prepare=None, binary=None):
            return super().execute(query, params, prepare=True, binary=binary)


def cursor(using: str = "default"):
    """A cursor on ``using``'s connection (its transaction) whose statements are prepared, or
    None when prepared statements are off or the driver is not psycopg 3."""
    connection = connections[using]
    connection.ensure_connection()
    raw = connection.connection
    if not enabled() or psycopg is None or not isinstance(raw, psycopg.Connection):
        return None
    if raw.prepare_threshold is None:
        raw.prepare_threshold = EXPLICIT_ONLY
    return connection._prepare_cursor(_PreparingCursor(raw))


#: Most ids a statement binds to run on the prepared cursor. A generic plan is made for an
#: array of unknown length (PostgreSQL guesses 10 to 100 elements); for a large batch it can be
#: far off (a threshold change's 2,000-item chunks ran 4x slower at 10⁵ captures), and a large
#: batch's own planning is a small part of its cost anyway, so it is planned for its ids.
GENERIC_MAX_IDS = 100


class Hot:
    """The prepared cursor of one engine transaction, made when its first hot statement runs:
    a transaction that runs none (a recount, "Recompute now" of a model with no item count)
    makes none."""

    __slots__ = ("_cursor", "_made", "using")

    def __init__(self, using: str) -> None:
        self.using = using
        self._cursor = None
        self._made = False

    def get(self):
        if not self._made:
            self._cursor, self._made = cursor(self.using), True
        return self._cursor


def arrays(cursor_, params: list) -> list:
    """``params`` with each list of integers in the form ``cursor_`` binds fastest: as it is
    for the prepared cursor (sent in binary); as the array's text for Django's cursor, which
    binds on the client and quotes a list element by element (a regular expression each): a
    bulk pass's 2,300-id arrays, four or five a chunk, spent 2.4 s of a 22 s backfill at 10⁶
    being quoted. The SQL casts them (``%s::bigint[]``) either way."""
    if psycopg is not None and isinstance(getattr(cursor_, "cursor", cursor_), _PreparingCursor):
        return params
    # Lists of ids and amounts only: the first element tells (a list mixing in anything else
    # would fail its cast, loudly).
    return [
        "{" + ",".join(map(str, p)) + "}" if isinstance(p, list) and _ints(p) else p for p in params
    ]


def _ints(values: list) -> bool:
    return not values or (type(values[0]) is int and type(values[-1]) is int)


def of(cursor_, ids: int = 0):
    """The cursor to run a hot statement binding ``ids`` ids on: the engine transaction's
    prepared cursor when it has one (``engine_transaction`` attaches a :class:`Hot`) and the
    batch is small, else ``cursor_`` itself."""
    hot = getattr(cursor_, "prepared", None)
    made = hot.get() if hot is not None and ids <= GENERIC_MAX_IDS else None
    return made if made is not None else cursor_
