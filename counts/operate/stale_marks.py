"""The marks a bulk pass has read, and the stale items they name (``Stale``).

A pass over an item kind (``counts.operate.item_sweep``) must know, at each chunk, which items
of its range have marks waiting: a dry run leaves them out (their ledgers lag by design), a
repair locks them whatever they look like. Marks keep arriving while the pass runs, so each
chunk reads those no earlier chunk has read, as part of its own statement.
"""

from __future__ import annotations

from counts.base.names import MARK_TABLE, literal
from counts.compile.item_sql import in_range
from counts.compile.stale_items import stale_sql
from counts.declare.kinds import ItemKind

#: The stale items of the marks a pass has read (``Stale``), and the ids of those marks, per
#: session.
STALE_TABLE = "counts_pass_stale"
SEEN_TABLE = "counts_pass_seen"


class Stale:
    """The items of a kind covered by marks, as a pass reads them chunk by chunk.

    Marks may name millions of items (a load's statement-level triggers write one mark per
    statement and kind): unnesting them all again for each chunk cost 1-2 s a chunk at 10^7.
    So each mark is read once, by the first chunk whose statement sees it: its items go into a
    temporary table read by range, its id into another, and each chunk's statement unnests
    only the marks whose id is not there yet. A mark drained meanwhile leaves its items in the
    table: counted stale a little longer, which a pass tolerates (it only compares them again).

    Finding the marks not read yet took one probe per waiting mark of the kind, each chunk:
    while no drain takes them (workers stopped during a deploy's backfill), a cost per chunk
    that grew with the backlog, 0.6 µs a mark (615 ms a chunk with 900,000 waiting, a 10^7
    backfill 5.4 times its baseline). So each chunk reads only the marks above a *floor*, a
    mark id at or below which every mark that will ever commit has been read already.

    Each statement that reads marks notes the highest mark id its snapshot sees, and the next
    statement, in a later transaction, pairs it with that transaction's id: every mark at or
    below the noted id was drawn before the first snapshot (ids are handed out in the order
    drawn), by a transaction that already had its transaction id (the id's default assigns
    one first: migration ``0006``), so a smaller one than the pair's. Once a statement's
    snapshot shows none of those transactions running, all had ended when it began: it saw
    every one of their marks that committed, and the floor rises to the noted mark id.

    "Running" is read from the snapshot (``pg_snapshot_xip``), leaving out only transactions
    seen holding their id's lock from a backend of *another* database, which cannot write our
    marks: a long write elsewhere in the cluster must not hold the floor back (the snapshot's
    ``xmin`` alone would). A transaction left open here, a long writer or another pass's
    chunk, does hold it back: the pass is then as slow as before, never wrong.
    """

    def __init__(self, cursor, kind: ItemKind, ignored: list[int] = ()) -> None:
        self.kind = kind
        #: Every mark at or below this id that commits has been read (see the class).
        self.floor = 0
        #: ``(mark id, transaction id)`` noted by statements, oldest first, not yet the floor.
        self._noted: list[tuple[int, int]] = []
        #: The last statement's highest mark id, and its transaction id, not yet paired.
        self._highest: int | None = None
        self._xid: int | None = None
        self.close(cursor)
        cursor.execute(f"CREATE TEMPORARY TABLE {SEEN_TABLE} (id bigint PRIMARY KEY)")
        cursor.execute(f"CREATE TEMPORARY TABLE {STALE_TABLE} (id bigint NOT NULL)")
        # Left out from the start: the pass's own lease (``ignored``), which covers every item
        # for the drains' sake and would make the pass take every item of each range, with or
        # without anything to count (2.2 times a new count's candidates).
        cursor.execute(
            f"INSERT INTO pg_temp.{SEEN_TABLE} SELECT DISTINCT unnest(%s::bigint[])",
            [list(ignored)],
        )
        absorb, params = self._absorb()
        cursor.execute(f"{absorb} SELECT count(*), {self.snapshot_columns()} FROM absorbed", params)
        self.observed(*cursor.fetchone()[1:])
        cursor.execute(f"CREATE INDEX ON pg_temp.{STALE_TABLE} (id)")
        cursor.execute(f"ANALYZE pg_temp.{STALE_TABLE}")

    def _absorb(self) -> tuple[str, list]:
        """A ``WITH`` clause whose CTEs record the marks not read yet and their items (CTE
        ``absorbed``: those items), and its parameters."""
        only = "m.id IN (SELECT id FROM unread)"
        return (
            f"WITH unread AS (INSERT INTO pg_temp.{SEEN_TABLE} SELECT m.id FROM {MARK_TABLE} m"
            f" WHERE m.target = %s AND m.id > %s"
            f" AND NOT EXISTS (SELECT 1 FROM pg_temp.{SEEN_TABLE} s WHERE s.id = m.id)"
            " RETURNING id),"
            f" absorbed AS (INSERT INTO pg_temp.{STALE_TABLE}"
            f" SELECT DISTINCT id FROM ({stale_sql(self.kind, only)}) s RETURNING id)",
            [self.kind.mark_target, self.floor],
        )

    def snapshot_columns(self) -> str:
        """Three columns for the statement that reads the marks, for :meth:`observed`: the
        highest mark id of the kind its snapshot sees; the oldest transaction id still running
        in that snapshot that may be this database's (else the snapshot's ``xmax``); and the
        statement's own transaction id (assigned now if it has none)."""
        k = literal(self.kind.mark_target)
        snapshot = "pg_current_snapshot()"
        elsewhere = (
            "SELECT l.transactionid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'transactionid' AND l.granted AND l.transactionid IS NOT NULL"
            " AND a.datname <> current_database()"
        )
        return (
            f"(SELECT max(id) FROM {MARK_TABLE} WHERE target = {k}),"
            f" (SELECT coalesce(min(x), pg_snapshot_xmax({snapshot}))"
            f" FROM pg_snapshot_xip({snapshot}) x WHERE xid(x) NOT IN ({elsewhere}))::text::bigint,"
            " pg_current_xact_id()::text::bigint"
        )

    def observed(self, highest: int | None, horizon: int, xid: int) -> None:
        """After a statement that read the marks above the floor (see the class): its snapshot
        saw ``highest`` and nothing of this database running below ``horizon``; ``xid`` is its
        transaction's id. Each statement must run in a transaction of its own."""
        if self._highest is not None and xid != self._xid:
            # This transaction began after the previous statement's snapshot: its id is above
            # every one a drawer of a mark id up to that snapshot's highest could have had.
            self._noted.append((self._highest, xid))
            self._highest = None
        if highest is not None and highest > self.floor:
            self._highest, self._xid = highest, xid
        while self._noted and self._noted[0][1] <= horizon:
            self.floor = max(self.floor, self._noted.pop(0)[0])

    def chunk_sql(self, lo, hi) -> tuple[str, str, list]:
        """``(with, select, params)``: a ``WITH`` clause that reads the marks no chunk has read
        yet, to begin the chunk's statement, and ``SELECT id``: the stale items of
        ``(lo, hi]`` as that statement sees them."""
        absorb, params = self._absorb()
        return (
            absorb,
            f"SELECT id FROM pg_temp.{STALE_TABLE} WHERE {in_range('id', (lo, hi))}"
            f" UNION SELECT id FROM absorbed WHERE {in_range('id', (lo, hi))}",
            params,
        )

    @staticmethod
    def close(cursor) -> None:
        cursor.execute(f"DROP TABLE IF EXISTS pg_temp.{STALE_TABLE}, pg_temp.{SEEN_TABLE}")
