"""``CachedCountField``: the declaration that is the engine's whole API.

A cached count is an ordinary integer column whose value the engine owns. The declaration says,
in ORM terms, what it counts::

    detections_count = CachedCountField(
        "captures__detections", filter=Q(captures__detections__bbox__isnull=False)
    )

Everything else — which tables can change it, the triggers that mark it dirty, the aggregate
that recomputes it — is derived from these declarations in ``counts.spec`` and ``counts.graph``.

How cheaply a count is kept follows from its shape (``counts.modes``; ``manage.py counts
status`` prints each count's mode): **own-row** when every input is a column of the counted
rows (plain and filtered reverse-FK counts, M2M counts); **item** when the counted rows' worth
depends on rows joined to one *item* row — their children (detections of a station's captures,
"captures with a valid detection" of a set), a setting reached by ``F()`` through forward
foreign keys (a project's threshold), or a distinct foreign key (taxa); **full** otherwise
(paths of three relations or more, filters mixing relations with OR): those are recounted
from their target rows after every change, at a cost that follows the target's size.

The first cached count on a model also gives it a ``counts_updated_at`` column: the time its
counts last changed value. Freshness is part of what users see, so every counted model has it.

**The engine owns these columns.** Nobody else changes a cached column or ``counts_updated_at``:
guard triggers (``counts.guards``) keep the old values on every other ``UPDATE`` — a stale
instance's ``save()``, ``bulk_update()``, ``queryset.update()``, raw SQL — and mark a row
inserted with made-up counts for recount. Read them; never write them.
"""

from django.db import models
from django.db.models import Q

from counts.errors import DeclarationError

#: Column added to every model with cached counts.
FRESHNESS_FIELD = "counts_updated_at"


class CachedCountField(models.IntegerField):
    """An integer column kept equal to a count over related rows, written only by the engine.

    Values assigned in Python are ignored by the database when saved (the guard triggers keep
    the stored count), and a row inserted with counts other than 0 is recounted.

    Args:
        path: Relation path from the model to the counted rows (``"images"``,
            ``"captures__detections"``, ``"occurrences__determination"``).
        filter: Which rows count; lookups start from the model, like the ``filter`` of
            ``Count``. ``F()`` references are resolved from the model too.
        distinct: When the path ends in a forward foreign key, count distinct targets of it
            (distinct taxa) rather than rows that point at one. Rows at the end of a to-many
            path are always counted once each, however many rows the filter joins.
    """

    description = "Integer count maintained by the counts engine"

    def __init__(self, path=None, *, filter=None, distinct=False, **kwargs):
        if filter is not None and not isinstance(filter, Q):
            raise DeclarationError("CachedCountField", "filter= takes a Q object")
        self.count_path = path
        self.count_filter = filter
        self.count_distinct = bool(distinct)
        kwargs.setdefault("default", 0)
        # A database default too: a row inserted by raw SQL or another client that knows nothing
        # of cached columns must not fail on NOT NULL (its triggers mark it dirty anyway).
        kwargs.setdefault("db_default", 0)
        kwargs.setdefault("editable", False)
        super().__init__(**kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["path"] = self.count_path
        if self.count_filter is not None:
            kwargs["filter"] = self.count_filter
        if self.count_distinct:
            kwargs["distinct"] = True
        if kwargs.get("default") == 0:
            kwargs.pop("default")
        if kwargs.get("editable") is False:
            kwargs.pop("editable")
        return name, path, args, kwargs

    def contribute_to_class(self, cls, name, private_only=False):
        super().contribute_to_class(cls, name, private_only=private_only)
        # Models rebuilt from migration state (module "__fake__") carry the freshness column
        # in their recorded fields already; adding it again would clash.
        if cls._meta.abstract or cls.__module__ == "__fake__":
            return
        if any(f.name == FRESHNESS_FIELD for f in cls._meta.local_fields):
            return
        freshness = models.DateTimeField(
            null=True,
            blank=True,
            editable=False,
            help_text="When the engine last changed this row's cached counts.",
        )
        freshness.contribute_to_class(cls, FRESHNESS_FIELD)


def cached_count_fields(model) -> list[CachedCountField]:
    """The model's cached counts, in declaration order."""
    return [f for f in model._meta.concrete_fields if isinstance(f, CachedCountField)]
