"""``CachedCountField``: the declaration that is the engine's whole API.

A cached count is an ordinary integer column whose value the engine owns. The declaration says,
in ORM terms, what it counts::

    detections_count = CachedCountField(
        "captures__detections", filter=Q(captures__detections__bbox__isnull=False)
    )

Everything else — which tables can change it, the triggers that mark it dirty, the aggregate
that recomputes it — is derived from these declarations in ``counts.declare.spec`` and
``counts.declare.graph``.

How cheaply a count is kept follows from its shape (``counts.declare.modes``; ``manage.py counts
status`` prints each count's mode): **own-row** when every input is a column of the counted
rows (plain and filtered reverse-FK counts, M2M counts; ``fk__isnull`` and ``fk=None`` test the
row's own foreign-key column, no join); **item** when the counted rows' worth
depends on rows joined to one *item* row — their children (detections of a station's captures,
"captures with a valid detection" of a set), a setting reached by ``F()`` through forward
foreign keys (a project's threshold), or a distinct foreign key (taxa), or an M2M filtered on
the related rows' own columns (each related row an item, worth one to every row it is linked
to, when the through table links a pair at most once) — including counted rows
that reach the target through several rows, forward, reverse or M2M (a capture set's distinct
occurrences and taxa, through its captures' detections), and rows counted through a run of
reverse relations of any length (a library's shelves' books' reviews: the books are the items,
each worth its reviews; an M2M may be the first relation, when it links a pair at most once),
with a filter on the counted rows and on any row above them up to the target (the book's
pages, the shelf's name), in an AND, or in an OR or a NOT that tests the rows above in one
place (reviews of four stars or of a long book); **full** otherwise (a path whose rows could
reach a target twice, such as an M2M below a reverse relation or through a model that can
link a pair twice; a filter reading a relation off the path, or testing the rows above the
counted ones in two places of an OR or a NOT): those are recounted from their target rows
after every change, at a cost that follows the target's size. ``manage.py counts status``
says which, and why.

The first cached count on a model also gives it a ``counts_updated_at`` column: the time its
counts last changed value. Freshness is part of what users see, so every counted model has it.

**The engine owns these columns.** Nobody else changes a cached column or ``counts_updated_at``:
guard triggers (``counts.compile.guards``) keep the old values on every other ``UPDATE`` — a stale
instance's ``save()``, ``bulk_update()``, ``queryset.update()``, raw SQL — and mark a row
inserted with made-up counts for recount. Read them; never write them.

Instances in memory and refused declarations: see :class:`CachedCountField`.
"""

from django.db import models

from counts.base.names import FRESHNESS_FIELD, count_fields
from counts.declare.checks import declaration_errors

__all__ = ["FRESHNESS_FIELD", "CachedCountField", "cached_count_fields"]


class CachedCountField(models.IntegerField):
    """An integer column kept equal to a count over related rows, written only by the engine.

    Values assigned in Python are ignored by the database when saved (the guard triggers keep
    the stored count); an ORM insert starts from 0, and a row inserted otherwise (raw SQL,
    ``loaddata``) with counts other than 0 is recounted.

    Args:
        path: Relation path from the model to the counted rows (``"images"``,
            ``"captures__detections"``, ``"occurrences__determination"``).
        filter: Which rows count, a ``Q``; lookups start from the model, like the ``filter``
            of ``Count``. ``F()`` references are resolved from the model too.
        exclude: Not supported (``counts.E003``): negate in the filter, ``filter=~Q(...)``.
            Accepted here only so that ``manage.py check`` can say so.
        distinct: When the path ends in a forward foreign key, count distinct targets of it
            (distinct taxa) rather than rows that point at one. Rows at the end of a to-many
            path are always counted once each, however many rows the filter joins. A
            distinct count also keeps, per target and counted value, how many counted rows
            carry it: a grouped count, read with ``counts.api.value_counts(model, name)``.

    **Instances in memory.** Counts are read from the database: an instance holds what it loaded,
    and nothing refreshes it. After ``save()`` — or after a drain recomputed the row — the instance
    still shows the counts it was loaded with; call ``instance.refresh_counts()`` (one query: every
    count exact in this snapshot, changes not yet drained included, with ``counts_exact``,
    ``counts_pending`` and ``counts_updated_at``: ``counts.exact``), added to every model that
    declares a count unless the model defines its own. An instance inserted by the ORM
    (``save()``, ``create()``, ``bulk_create()``, a clone made with ``pk = None; save()``) starts
    from 0 and no freshness, whatever it held: its counts are the engine's to fill, by the marks
    its related rows write.

    **Refused declarations** are reported by ``manage.py check`` (Django system check errors, all at
    once, each naming the model and field, what was given, why, and what to write instead) and kept
    out of the engine: no trigger is compiled, written or installed for them. The ids
    (``counts.declare.checks.CHECKS``):

    - ``counts.E001`` — no path, or a path that is not a string.
    - ``counts.E002`` — ``filter=`` is not a ``Q`` object (a dict, a string, an expression).
    - ``counts.E003`` — ``exclude=`` is not supported: negate in the filter, ``filter=~Q(...)``.
    - ``counts.E004`` — a part of the path is not a relation name of the model it is looked up on
      (an unknown name, an accessor such as ``post_set``, a lookup such as ``isnull``).
    - ``counts.E005`` — the path ends at a column (``children__value``): counts count rows; sums and
      other aggregates of a column are not supported.
    - ``counts.E006`` — the path crosses no to-many relation (``"project"``): nothing to count.
    - ``counts.E007`` — the path or filter crosses a relation the triggers cannot follow: a generic
      relation, a multi-column ``ForeignObject``, a relation to a model that is not installed.
    - ``counts.E008`` — a foreign key on the path or filter has ``to_field``: it points at a column
      other than the primary key, and the engine joins every relation by primary key.
    - ``counts.E009`` — a model the count reads (the model holding it, the counted model, a model on
      its path or reached by its filter, an M2M through model) has a primary key that is not an
      integer (UUID, string, composite): marks and ledgers hold integer ids.
    - ``counts.E010`` — the filter does not resolve as a Django lookup from the model.
    - ``counts.E011`` — the filter holds an expression (``Exists``, ``RawSQL``…) instead of lookups:
      the engine cannot tell which tables and columns it reads.
    - ``counts.E012`` — the model defines ``counts_updated_at`` itself as something other than a
      ``DateTimeField``: the engine's freshness column needs that name.
    """

    is_cached_count = True  # ``counts.base.names.count_fields`` finds counts by it

    description = "Integer count maintained by the counts engine"

    def __init__(self, path=None, *, filter=None, exclude=None, distinct=False, **kwargs):
        # Kept as given: what cannot be a count is refused by ``check()``
        # (``counts.declare.checks``), so ``manage.py check`` names every refused declaration at
        # once instead of the first
        # import failing with a traceback.
        self.count_path = path
        self.count_filter = filter
        self.count_exclude = exclude
        self.count_distinct = bool(distinct)
        kwargs.setdefault("default", 0)
        # A database default too: a row inserted by raw SQL or another client that knows nothing
        # of cached columns must not fail on NOT NULL (its triggers mark it dirty anyway).
        kwargs.setdefault("db_default", 0)
        kwargs.setdefault("editable", False)
        super().__init__(**kwargs)

    def deconstruct(self):
        name, _, args, kwargs = super().deconstruct()
        path = "counts.fields.CachedCountField"  # where migrations import it from
        kwargs["path"] = self.count_path
        if self.count_filter is not None:
            kwargs["filter"] = self.count_filter
        if self.count_exclude is not None:
            kwargs["exclude"] = self.count_exclude
        if self.count_distinct:
            kwargs["distinct"] = True
        if kwargs.get("default") == 0:
            kwargs.pop("default")
        if kwargs.get("editable") is False:
            kwargs.pop("editable")
        return name, path, args, kwargs

    def check(self, **kwargs):
        return [*super().check(**kwargs), *declaration_errors(self.model, self)]

    def pre_save(self, model_instance, add):
        """An ORM insert starts from 0 and no freshness, whatever the instance held (a clone
        made with ``pk = None`` carries its source's counts): the engine fills the new row's
        counts from the marks its related rows write. Raw saves (``loaddata``) keep their
        values, and the insert guard marks such a row for recount."""
        if add:
            setattr(model_instance, self.attname, 0)
            if FRESHNESS_FIELD in model_instance.__dict__:
                # Saved after the cached columns (it is created after them).
                model_instance.__dict__[FRESHNESS_FIELD] = None
        return super().pre_save(model_instance, add)

    def contribute_to_class(self, cls, name, private_only=False):
        super().contribute_to_class(cls, name, private_only=private_only)
        # Models rebuilt from migration state (module "__fake__") carry the freshness column
        # in their recorded fields already; adding it again would clash.
        if cls._meta.abstract or cls.__module__ == "__fake__":
            return
        if not hasattr(cls, "refresh_counts"):  # once per model, never over the model's own
            cls.refresh_counts = refresh_counts
        if any(f.name == FRESHNESS_FIELD for f in cls._meta.local_fields):
            return
        freshness = models.DateTimeField(
            null=True,
            blank=True,
            editable=False,
            help_text="When the engine last changed this row's cached counts.",
        )
        freshness.contribute_to_class(cls, FRESHNESS_FIELD)


#: How :func:`refresh_counts` reads: the engine's exact read (``counts.run.exact.apply_exact``, a
#: layer above this one), handed over by ``CountsConfig.ready()``; the stored columns before.
_reader = None


def read_counts_with(reader) -> None:
    global _reader
    _reader = reader


def refresh_counts(self) -> None:
    """Reload this instance's counts, exact in this snapshot (changes not yet drained
    included), with ``counts_exact``, ``counts_pending`` and ``counts_updated_at``, in one
    query (the rest of the instance is left as it is)."""
    if _reader is not None:
        _reader([self])
        return
    names = [f.attname for f in cached_count_fields(type(self))]
    self.refresh_from_db(fields=[*names, FRESHNESS_FIELD])


def cached_count_fields(model) -> list[CachedCountField]:
    """The model's cached counts, in declaration order."""
    return count_fields(model)
