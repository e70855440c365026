"""From ``CachedCountField`` declarations to frozen, database-free specs.

This is the only module that reads Django model metadata to understand a declaration. It turns
each path (``"images__detections__bbox"``, ``F("project__default_filters_score_threshold")``)
into a chain of :class:`Hop` objects and the columns the count reads on each table. The result,
:class:`CountSpec`, is plain frozen data that ``counts.declare.graph`` (pure) and
``counts.compile.triggers`` (pure SQL compilation) work from.

The kinds of relation a path can cross, and the hops they become:

- **forward FK / one-to-one** (``Deployment.project``): one ``forward`` hop; the link column
  lives on the parent row (``deployment.project_id``).
- **reverse FK / one-to-one** (``Deployment.events``): one ``reverse`` hop; the link column lives
  on the child row (``event.deployment_id``).
- **M2M, either side** (``SourceImageCollection.images``, ``SourceImage.collections``): two hops
  through the through table: ``reverse`` into it (its column pointing back at us) and
  ``forward`` out of it (its column pointing at the other side).
- **a setting reached by ``F()``** (``project__default_filters_score_threshold``): the forward
  hops to the row that holds it, plus that column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Q

from counts.base.errors import DeclarationError
from counts.declare.check_walk import unfollowable, walk_lookup

FORWARD = "forward"
REVERSE = "reverse"


@dataclass(frozen=True, order=True)
class Table:
    """A model's table, as the SQL compilers need it."""

    label: str  # "monitoring.deployment"
    db_table: str
    pk: str  # primary key column


@dataclass(frozen=True, order=True)
class Hop:
    """One step from a parent table to a child table.

    ``column`` is the foreign key that links them: on the child for ``reverse`` hops
    (``event.deployment_id``), on the parent for ``forward`` hops (``deployment.project_id``).
    """

    kind: str
    parent: Table
    child: Table
    column: str
    #: A forward hop out of an M2M through table: the far end is still a to-many relation.
    m2m: bool = False

    @property
    def to_many(self) -> bool:
        """A reverse hop can reach many children per parent row; a forward hop at most one."""
        return self.kind == REVERSE


Chain = tuple[Hop, ...]


@dataclass(frozen=True)
class CountSpec:
    """Everything the engine needs to know about one cached count.

    Attributes:
        target: The table holding the cached column.
        name: The field name (also its column's attname).
        column: The cached column.
        path / filter / distinct: The declaration, kept for the ORM aggregate.
        counted: Chain to the rows being counted (for a path ending in a forward FK, the chain
            to the rows holding that FK when ``distinct`` is off).
        reads: Every chain the count reads (path, filter and ``F()`` chains and their prefixes),
            with the columns it reads on the table each chain ends at. The empty chain stands
            for the target's own row.
    """

    target: Table
    name: str
    column: str
    path: str
    filter: Q | None
    distinct: bool
    counted: Chain
    path_chain: Chain
    reads: dict[Chain, frozenset[str]] = field(hash=False, compare=False)
    #: The filter looks below the counted rows through a to-many relation ("images with a
    #: valid detection"): it is evaluated as an EXISTS probe per counted row, never as a join.
    probes: bool = False
    #: How the engine keeps it up to date (``counts.declare.modes``): own-row, item or full.
    mode: object = field(default=None, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.target.label}.{self.name}"

    @property
    def join_signature(self) -> frozenset[Chain]:
        """Chains the aggregate joins; counts with equal signatures share one subquery."""
        if self.probes:
            return frozenset(self.counted[:i] for i in range(1, len(self.counted) + 1))
        return frozenset(chain for chain in self.reads if chain and self._joined(chain))

    def _joined(self, chain: Chain) -> bool:
        # A path's terminal forward FK is read as a column, never joined.
        return not (chain == self.path_chain and chain[-1].kind == FORWARD and not chain[-1].m2m)

    def needs_distinct(self, joined: frozenset[Chain]) -> bool:
        """Whether joins made for this or sibling counts can repeat a counted row."""
        if self.distinct:
            return True
        # A to-many hop off the counted chain (a branch, or a hop below the counted rows)
        # multiplies each counted row by its matches.
        return any(
            hop.to_many and chain[: i + 1] != self.counted[: i + 1]
            for chain in joined
            for i, hop in enumerate(chain)
        )


def table_of(model) -> Table:
    opts = model._meta
    return Table(label=opts.label_lower, db_table=opts.db_table, pk=opts.pk.column)


def _hops_for(model, relation) -> tuple[list[Hop], type]:
    """The hops that cross one relation field, and the model it leads to."""
    here = table_of(model)
    if relation.many_to_many:
        m2m = relation if relation.concrete else relation.field
        through = m2m.remote_field.through
        if relation.concrete:
            back, out = m2m.m2m_field_name(), m2m.m2m_reverse_field_name()
        else:
            back, out = m2m.m2m_reverse_field_name(), m2m.m2m_field_name()
        through_table = table_of(through)
        other = relation.related_model
        return [
            Hop(REVERSE, here, through_table, through._meta.get_field(back).column),
            Hop(FORWARD, through_table, table_of(other), through._meta.get_field(out).column, True),
        ], other
    other = relation.related_model
    if relation.concrete:  # forward FK or one-to-one
        if relation.target_field != other._meta.pk:
            raise DeclarationError(
                here.label, f"{relation.name} points at a non-primary-key column"
            )
        return [Hop(FORWARD, here, table_of(other), relation.column)], other
    if not hasattr(relation, "field") or not relation.field.concrete:
        raise DeclarationError(here.label, f"{relation.name}: generic relations are not supported")
    return [Hop(REVERSE, here, table_of(other), relation.field.column)], other


def walk(model, lookup: str) -> tuple[Chain, str | None]:
    """Follow a lookup from ``model``: the chain it crosses and the column it ends on, if any.

    The relations are followed as the checks follow them (``counts.declare.check_walk``), then
    each becomes its hops. Trailing parts that are not fields (``isnull``, ``gte``, transforms)
    are ignored: they change how a value is compared, not which values are read.
    """
    found = walk_lookup(model, lookup, strict=True)
    chain: list[Hop] = []
    for step in found.steps:
        chain.extend(_hops_for(step.model, step.relation)[0])
    stop = found.stop or (None,)
    if stop[0] == "unknown" and not found.steps:
        raise DeclarationError(model._meta.label_lower, f"{lookup!r}: {stop[2]!r} is not a field")
    if stop[0] == "unfollowable":
        step = stop[1]
        raise DeclarationError(
            model._meta.label_lower, f"{lookup!r}: {step.part!r} is {unfollowable(step.relation)}"
        )
    return tuple(chain), stop[2].column if stop[0] == "column" else None
