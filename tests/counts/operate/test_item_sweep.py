"""The bulk item pass's SQL: what each statement must contain, and must not, and what one reads.

Not snapshots of the builders' output: each assertion is a property the pass's speed or
correctness rests on (``counts.operate.item_sweep``), stated so that a change breaking it fails here
before a 10^6 bench or a race finds it.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.names import LEDGER_TABLE
from counts.base.prepared import arrays
from counts.compile.item_sql import truth_sql
from counts.operate.item_sweep import candidates_sql, may_count_sql, sweep_sql
from counts.run.engine_transaction import engine_transaction
from counts.run.item_locks import lock_items, lock_items_sql
from tests.plans import crowd, plan_reads

CAPTURES = "item:monitoring.sourceimage"
OCCURRENCES = "item:monitoring.occurrence"


def kind(name):
    return graph().kinds[name]


def test_candidates_read_only_the_range_of_every_table():
    sql = candidates_sql(kind(CAPTURES), 100, 200)
    # The ledgers and each child table are read by range of the item's id, both ends bound.
    assert "item_id > 100 AND item_id <= 200" in sql
    assert 'r."source_image_id" > 100 AND r."source_image_id" <= 200' in sql
    # Stale items are restricted to the range too (a job's items otherwise cost a scan).
    assert "s.id > 100 AND s.id <= 200" in sql
    # The last chunk is open-ended, to take the orphans past the last item.
    last = candidates_sql(kind(CAPTURES), 100, None)
    assert "item_id > 100" in last and "<=" not in last


def test_may_count_uses_range_scans_not_a_probe_per_item():
    sql = may_count_sql(kind(CAPTURES), 0, 5000)
    assert "EXISTS" not in sql
    assert sql.count("SELECT r.") == sql.count("UNION") + 1


def test_a_setting_is_joined_once_in_a_range_pass_and_probed_per_item_in_a_drain():
    occurrences = kind(OCCURRENCES)
    ranged = truth_sql(occurrences, "(SELECT unnest(%s::bigint[]) AS id)", within=(0, 5000))
    assert "LEFT JOIN (SELECT h1." in ranged and "sv.value" in ranged
    assert 'WHERE h1."id" = r."deployment_id"' not in ranged
    probed = truth_sql(occurrences, "(SELECT unnest(%s::bigint[]) AS id)")
    assert "sv.value" not in probed and "LATERAL" in probed


def test_the_sweep_deletes_emptied_ledgers_by_key_and_writes_only_what_changed():
    sql = sweep_sql(kind(CAPTURES), None, 0, 5000, write=True)
    assert re.search(
        r"DELETE FROM counts_ledger l WHERE l\.kind = '[^']+'\s+AND l\.item_id > 0"
        r" AND l\.item_id <= 5000\s+AND l\.item_id = ANY\(ARRAY\(",
        sql,
    )
    assert "USING fresh" not in sql
    # Each item's ledger is probed by its key, never joined as the statistics suggest.
    assert "FROM truth t LEFT JOIN LATERAL (SELECT state FROM counts_ledger o" in sql
    assert "o.item_id = t.id LIMIT 1) o ON true" in sql
    assert "WHERE coalesce(old, '{}') IS DISTINCT FROM new" in sql
    compare = sweep_sql(kind(CAPTURES), None, 0, 5000, write=False, ids=True)
    assert "INSERT" not in compare and "DELETE" not in compare and "FOR UPDATE" not in compare


def test_a_backfill_replaces_only_its_own_entries():
    key = kind(CAPTURES).parts[0].key
    sql = sweep_sql(kind(CAPTURES), [key], 0, 5000, write=True)
    assert f"(coalesce(o.state, '{{}}') - ARRAY['{key}']::text[])" in sql


def test_a_backfill_reads_only_what_its_own_counts_read():
    """Filling one count's entries builds those entries, not every count's of the kind: a
    capture's detections count never reads the capture sets' memberships, and only the
    captures with a ledger entry of it, or a detection it may count, are candidates."""
    captures = kind(CAPTURES)
    detections = next(p for p in captures.parts if p.label == "monitoring.sourceimage")
    through = "monitoring_sourceimagecollection_images"
    full = sweep_sql(captures, None, 0, 5000, write=True)
    keyed = sweep_sql(captures, [detections.key], 0, 5000, write=True)
    assert through in full and through not in keyed
    assert "monitoring_detection" in keyed
    others = [p.key for p in captures.parts if p.key != detections.key]
    truth = keyed.split(" fresh AS")[0]  # the entries built; credits read any entry
    assert all(k in full for k in others) and not any(k in truth for k in others)

    def compared(keys):  # the first array: the items compared (the second: the stale ones)
        return candidates_sql(captures, 0, 5000, "SELECT 1", keys).split("), ARRAY(")[0]

    assert f"state ?| ARRAY['{detections.key}']::text[]" in compared([detections.key])
    assert "?|" not in compared(None)  # every ledgered item, for a pass over every count


def test_items_are_locked_in_one_order_skipping_those_held(monkeypatch):
    seen = []

    class Cursor:
        prepared = None

        def execute(self, sql, params=None):
            seen.append(sql)

        def fetchall(self):
            return []

    lock_items(Cursor(), kind(CAPTURES), [3, 1, 2])
    [sql] = seen
    # Taken in (kind, id) order, each by a probe of its key that skips what another holds.
    assert '(SELECT kind, item_id FROM wanted w ORDER BY w.kind COLLATE "C", w.item_id) w' in sql
    assert "CROSS JOIN LATERAL (SELECT l.kind, l.item_id FROM counts_ledger l" in sql
    assert "l.item_id = w.item_id FOR UPDATE OF l SKIP LOCKED) l" in sql
    assert 'ORDER BY w.kind COLLATE "C", w.item_id ON CONFLICT (kind, item_id) DO NOTHING' in sql


@pytest.mark.django_db
def test_a_chunk_reads_its_own_range_while_the_ledger_statistics_still_say_empty(marks):
    """A rebuild from a lost state, or the counts of a fresh load, fill a ledger whose
    statistics say it is empty (autovacuum off, or not yet round). A late chunk's sweep must
    still read its own range once: not every ledger row of the chunk for every item (a nested
    loop: 3·10⁶ comparisons and 250 ms a chunk at 10⁵), not the item table from its first id
    (a merge join over an unbounded key: the whole table for the last chunks of a pass), not
    every ledger of the kind to delete the emptied ones."""
    captures = kind(CAPTURES)
    ids = crowd(4000, detected_every=2)  # the others have nothing to count: their ledgers go
    detected = ids[::2]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {LEDGER_TABLE}")
        for table in ("monitoring_sourceimage", "monitoring_detection", LEDGER_TABLE):
            cursor.execute(f"ANALYZE {table}")
        # The chunks the pass wrote before this one, the statistics none the wiser.
        cursor.execute(
            f"INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
            " SELECT %s, unnest(%s::bigint[]), '{\"x\": [1, 1]}'",
            [CAPTURES, ids[:3000]],
        )
    lo, hi = ids[2999], ids[-1]  # the last of four chunks
    chunk = [i for i in ids if lo < i <= hi]
    with engine_transaction("default") as cursor:
        locked = lock_items(cursor, captures, chunk)
        assert locked == chunk
        sql = sweep_sql(captures, None, lo, hi, write=True)
        scanned, thrown = plan_reads(cursor, sql, arrays(cursor, [locked]))
        cursor.execute(
            f"SELECT array_agg(item_id ORDER BY item_id) FROM {LEDGER_TABLE}"
            " WHERE kind = %s AND item_id > %s",
            [CAPTURES, lo],
        )
        # Each detected capture's ledger written, the others' empty rows deleted.
        assert cursor.fetchone()[0] == [i for i in chunk if i in set(detected)]
    assert thrown <= len(chunk), f"joins compared {thrown} rows for {len(chunk)} items"
    assert scanned["monitoring_sourceimage"] <= 2 * len(chunk), scanned
    assert scanned[LEDGER_TABLE] <= 3 * len(chunk), scanned


@pytest.mark.django_db
def test_locking_a_chunk_probes_the_ledger_per_item_however_many_ledgers_there_are(marks):
    """A bulk pass locks 5,000 items a chunk. Joined to the ledger, the lock was planned as a
    hash join over every ledger row of the kind, a cost growing with each chunk the pass had
    written (228 ms a chunk at 500k ledgers: a rebuild of 10^6 books at 2,000 rows/s). Each
    wanted item is one probe of the ledger's key, for the rows it must create and those it
    must lock."""
    captures = kind(CAPTURES)
    ids = crowd(6000, detected_every=None)
    with connection.cursor() as cursor:
        # Ledgers for the first 5,000; the last 1,000 items are new, half of them still
        # without a ledger row.
        cursor.execute(
            f"INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
            " SELECT %s, unnest(%s::bigint[]), '{}'",
            [CAPTURES, ids[:5000] + ids[5000:5500]],
        )
        cursor.execute(f"ANALYZE {LEDGER_TABLE}")
    chunk = ids[5000:]
    with engine_transaction("default") as cursor:
        sql = lock_items_sql(captures)
        scanned, thrown = plan_reads(cursor, sql, arrays(cursor, [chunk]))
    assert thrown <= len(chunk), f"joins compared {thrown} rows for {len(chunk)} items"
    # Two probes per item (is there a row? lock it): never the other 5,000 ledgers.
    assert scanned[LEDGER_TABLE] <= 2 * len(chunk), scanned
    with engine_transaction("default") as cursor:
        assert lock_items(cursor, captures, chunk) == chunk
