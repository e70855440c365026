"""Waiting, briefly and in one order, for target rows another transaction holds.

A drain locks its target rows ``SKIP LOCKED`` (``counts.run.aggregate.lock``): a row someone holds
is left out and its work goes back to the queue, due a second later (``counts.run.marks.defer``),
so one busy row cannot stall a batch and no drain deadlocks. On hot targets that made more
drainers slower, not faster: a backlog of writes on one capture set credits the same few rows
(the set, its stations and nights); every extra drainer found some of them held by another
drainer and handed their credits back a second later, then waited for them to come due
(issue 27, case 5). Waiting for the held row instead is not enough on its own: two drainers
that each took one of the rows the other wants wait for each other.

So a drain that finds a target row held rolls its target writes back to a savepoint (which
releases the rows it took) and locks **every** target row of the batch in one global order,
(label, id), waiting at most :data:`WAIT_MS` for each (:func:`lock_in_order`); then it writes.
Drainers waiting in one order cannot wait in a circle among themselves; another drainer holds
a target row only for the tail of its transaction (write, commit: milliseconds), so the wait
is short. A row held longer (an admin transaction left open, a recount of a 500k-image set, a
writer's ``bulk_update`` in its own order) makes the wait give up after :data:`WAIT_MS`, and
the drain puts that row's work back as before. The timeout is far below PostgreSQL's
``deadlock_timeout``, so a wait that a writer's locks close into a circle ends that way too.
Rows locked after a wait are recounted by later statements, whose snapshots see the other
drain's commit, like rows locked at once.
"""

from __future__ import annotations

from django.db import OperationalError

#: Milliseconds a drain waits for one held target row before putting its work back.
WAIT_MS = 200
#: A batch with more target rows than this is not locked row by row (it puts work back).
MAX_ROWS = 10_000

_SAVEPOINT = "counts_held_rows"
_LOCK_NOT_AVAILABLE = "55P03"


def lock_in_order(cursor, wanted: list[tuple[str, str, list[int]]]) -> bool:
    """Lock the rows of ``wanted`` (``[(table, pk column, ids)]``, in label order) with
    ``FOR NO KEY UPDATE`` in that order, id order within a table, waiting at most
    :data:`WAIT_MS` for each. All or none: False (nothing locked) when one stayed held. The
    transaction's lock timeout is restored after."""
    if sum(len(ids) for _table, _pk, ids in wanted) > MAX_ROWS:
        return False
    cursor.execute(f"SAVEPOINT {_SAVEPOINT}")
    cursor.execute(
        "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)",
        [f"{WAIT_MS}ms"],
    )
    before = cursor.fetchone()[0]
    q = (
        cursor.db.ops.quote_name
    )  # (not counts.compile.triggers.q: this module imports no engine module)
    try:
        for table, pk, ids in wanted:
            cursor.execute(
                f"SELECT 1 FROM {q(table)} WHERE {q(pk)} = ANY(%s)"
                f" ORDER BY {q(pk)} FOR NO KEY UPDATE",
                [ids],
            )
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        # Rolling back to the savepoint releases what it locked and undoes the timeout.
        cursor.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        return False
    cursor.execute("SELECT set_config('lock_timeout', %s, true)", [before])
    return True
