"""A backfill's lease: marks covering what it has not filled yet, which drains take only if it
dies.

While a backfill runs, the items it has not swept and the rows it has not recounted are covered
by nothing a drain would see: the new column holds zeros with no ledger entry behind them. So
before its first chunk a backfill commits marks that cover them, due only after
``COUNTS_BACKFILL_LEASE_S`` and renewed after every chunk. If it dies, they fall due and the
workers take them: draining an "every item" or "every row" mark is exact, only slower.

- A swept item kind gets an "every item" mark **naming the ledger keys** it leaves behind
  (``payload`` ``{"keys": [...]}``). Only a reader of those keys takes every item as stale for
  it (``counts.compile.stale_items.every_item_sql``); everything else the kind feeds is kept by
  the drains meanwhile, so recounts of other counts stay cheap. Named by key, each target's
  lease ends as soon as its own sweep of the kind is done, whatever other targets of the same
  migration still need of that kind.
- A recounted target gets an "every row" mark, ended once its rows are recounted.

A migration backfilling several targets takes all their leases in one transaction before the
first (``counts.operations.BackfillCounts``): killed between two targets, the later ones'
counts are covered too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from django.conf import settings
from django.db import connections, transaction

from counts.base.names import MARK_TABLE

#: Seconds a lease's marks wait before drains take them (``COUNTS_BACKFILL_LEASE_S``): how
#: long counts may stay behind after a backfill dies.
LEASE_S = 60.0


def lease_s() -> float:
    return float(getattr(settings, "COUNTS_BACKFILL_LEASE_S", LEASE_S))


class Lease:
    """The marks one migration's backfills hold, by ``(backfilled label, mark target)``."""

    def __init__(self, held: dict[tuple[str, str], int], using: str) -> None:
        self.held = held
        self.using = using

    @classmethod
    def take(cls, covers: Iterable[tuple[str, str, list[str] | None]], using: str) -> Lease:
        """Commit one mark per ``(label, mark target, ledger keys)``, in one transaction: an
        item kind's "every item" mark naming the keys ``label``'s backfill has not swept yet,
        or (keys None, target ``label``) an "every row" mark while its rows wait for their
        recount."""
        held = {}
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            for label, target, keys in covers:
                cursor.execute(
                    f"INSERT INTO {MARK_TABLE} (target, ids, payload, not_before)"
                    " VALUES (%s, NULL, %s::jsonb, now() + make_interval(secs => %s))"
                    " RETURNING id",
                    [target, None if keys is None else json.dumps({"keys": keys}), lease_s()],
                )
                held[(label, target)] = cursor.fetchone()[0]
        return cls(held, using)

    def ids(self) -> list[int]:
        """The marks still held: a pass leaves them out of its stale items (they cover every
        item for the drains' sake, not because anything changed)."""
        return sorted(self.held.values())

    def renew(self) -> None:
        """Push every held mark's due time a lease further (after each chunk)."""
        if not self.held:
            return
        with transaction.atomic(using=self.using), connections[self.using].cursor() as cursor:
            cursor.execute(
                f"UPDATE {MARK_TABLE} SET not_before = now() + make_interval(secs => %s)"
                " WHERE id = ANY(%s)",
                [lease_s(), self.ids()],
            )

    def end(self, label: str | None = None, target: str | None = None) -> None:
        """Delete the marks of ``label`` (of its ``target`` only, if given); all when None."""
        ending = [
            key
            for key in self.held
            if (label is None or key[0] == label) and (target is None or key[1] == target)
        ]
        if not ending:
            return
        with transaction.atomic(using=self.using), connections[self.using].cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {MARK_TABLE} WHERE id = ANY(%s)", [[self.held[k] for k in ending]]
            )
        for key in ending:
            del self.held[key]
