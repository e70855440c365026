from django.db import migrations


class Migration(migrations.Migration):
    """Leave a tenth of each capture page free, so the drain's update of a capture's cached
    count stays on its page (a HOT update) instead of adding an entry to each of the table's
    four indexes. Captures are loaded once and updated once or twice when their detections
    arrive; packed pages made nine updates in ten non-HOT at 10⁶ captures, about 8 index
    buffers more per capture written.

    Only pages written from now on are affected: the setting takes a lock that blocks neither
    reads nor writes. An existing table gains it on its next rewrite (``VACUUM FULL`` or
    pg_repack, at a quiet hour).
    """

    dependencies = [
        ("monitoring", "0007_count_triggers"),
    ]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE monitoring_sourceimage SET (fillfactor = 90)",
            "ALTER TABLE monitoring_sourceimage RESET (fillfactor)",
        ),
    ]
