"""The engine's tables: the dirty-mark queue and the items' ledgers.

Append-only and keyless on purpose: triggers insert into it inside the writer's transaction,
and concurrent writers never wait on each other's uncommitted marks the way a unique key would
make them. Duplicates are cheap and collapse when a drain groups marks by target.
"""

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models.functions import Now


class DirtyMark(models.Model):
    """Rows of ``target`` whose cached counts may be stale, or items that may count differently.

    Seven kinds (delta, recount, every row, route, item, every item, job), told apart by the
    columns in one place only: ``counts.base.mark`` (its table says what each kind asks for).

    ``not_before`` is set on a mark that is due later: written again for rows another
    transaction held (drains leave it alone until then, so a busy row is retried, not spun
    on), or a backfill's lease (``counts.operate.backfill``).
    """

    id = models.BigAutoField(primary_key=True)
    target = models.CharField(max_length=100, help_text="Model label, e.g. monitoring.event")
    ids = ArrayField(models.BigIntegerField(), null=True, blank=True)
    field = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001 (NULL: no delta)
    deltas = ArrayField(models.IntegerField(), null=True, blank=True)
    #: A job mark's ``[old, new]`` per id (``counts.declare.jobs``).
    payload = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    not_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "counts_dirtymark"
        indexes = [models.Index(fields=["target", "id"], name="counts_mark_target_id")]
        permissions = [("recompute_counts", "Can recompute cached counts now")]

    def __str__(self) -> str:
        size = "all" if self.ids is None else len(self.ids)
        return f"{self.target} ({size})"


class Ledger(models.Model):
    """What each item's contribution was credited as, per count (``counts.run.items``).

    ``state`` is ``{"<ledger key>": [amount, target id, ...]}``; no row means nothing was
    credited. Written only by drains (and reconcile's ledger audit), under the row's lock.
    """

    pk = models.CompositePrimaryKey("kind", "item_id")
    kind = models.CharField(max_length=100)
    item_id = models.BigIntegerField()
    state = models.JSONField()

    class Meta:
        db_table = "counts_ledger"

    def __str__(self) -> str:
        return f"{self.kind} #{self.item_id}"


class Multiplicity(models.Model):
    """How many counted items carry ``value`` for ``target_id``, per distinct count (``key``,
    its ledger key): the count is the number of its pairs with ``n > 0``
    (``counts.run.multiplicity``). Written only by drains and reconcile, under the row's lock."""

    pk = models.CompositePrimaryKey("key", "target_id", "value")
    key = models.CharField(max_length=16)
    target_id = models.BigIntegerField()
    value = models.BigIntegerField()
    n = models.IntegerField()

    class Meta:
        db_table = "counts_multiplicity"

    def __str__(self) -> str:
        return f"{self.key} {self.target_id}/{self.value}: {self.n}"
