from django.db import migrations


class Migration(migrations.Migration):
    """Leave room in ledger and multiplicity pages for the next version of a row.

    Every drain that recomputes an item rewrites its ledger row, and every occurrence that
    flips rewrites a multiplicity row. Packed pages (a backfill fills the ledger in id order)
    made 97.6% of ledger updates at 10⁶ captures non-HOT: a new primary-key entry per update,
    and an index that grows with every drain. With free space on the page the update is HOT
    and the index is left alone.

    Pages written from now on get it; the lock taken blocks neither reads nor writes. An
    existing ledger gains it on its next rewrite (``VACUUM FULL counts_ledger``, at a quiet
    hour).
    """

    dependencies = [
        ("counts", "0004_job_payload_multiplicity"),
    ]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE counts_ledger SET (fillfactor = 85);"
            " ALTER TABLE counts_multiplicity SET (fillfactor = 85)",
            "ALTER TABLE counts_ledger RESET (fillfactor);"
            " ALTER TABLE counts_multiplicity RESET (fillfactor)",
        ),
    ]
