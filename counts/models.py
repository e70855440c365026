"""The dirty-mark queue: the engine's only table.

Append-only and keyless on purpose: triggers insert into it inside the writer's transaction,
and concurrent writers never wait on each other's uncommitted marks the way a unique key would
make them. Duplicates are cheap and collapse when a drain groups marks by target.
"""

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models.functions import Now


class DirtyMark(models.Model):
    """Rows of ``target`` whose cached counts may be stale.

    ``ids`` NULL means every row of the target (written by TRUNCATE and by backfills).
    ``not_before`` is set on a mark a drain wrote again for rows another transaction held:
    drains leave it alone until then, so a busy row is retried, not spun on.
    """

    id = models.BigAutoField(primary_key=True)
    target = models.CharField(max_length=100, help_text="Model label, e.g. monitoring.event")
    ids = ArrayField(models.BigIntegerField(), null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    not_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "counts_dirtymark"
        indexes = [models.Index(fields=["target", "id"], name="counts_mark_target_id")]
        permissions = [("recompute_counts", "Can recompute cached counts now")]

    def __str__(self) -> str:
        size = "all" if self.ids is None else len(self.ids)
        return f"{self.target} ({size})"
