"""The dependency graph: which table changes can change which cached counts.

Pure data in, pure data out: no ORM, no database. Built once from the frozen specs of
``counts.declare.spec`` and sealed; triggers are compiled from it and the write-path hook reads it.

For every table a count reads, a :class:`Route` says how a changed row of that table leads back
to the rows holding the count, and which of its columns matter:

- rows reached by a **reverse** hop (children: events, captures, detections, through rows)
  change counts when inserted, deleted, or when a column the count reads changes;
- rows reached by a **forward** hop (parents and settings: a project's threshold, a taxon)
  change counts only when a column the count reads changes — inserting one is invisible until
  a child points at it, and deleting one deletes or re-points its children first;
- the **target's own row** (the empty chain) matters only when a column it reads changes
  (``deployment.project_id`` moves its occurrences under another threshold).

Cached columns themselves are never read, so the engine's own writes never mark anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from django.apps import apps

from counts.base.errors import UnknownTargetError
from counts.base.names import OPERATIONS
from counts.declare.jobs import build_jobs
from counts.declare.kinds import build_kinds
from counts.declare.modes import Full, ItemCount, OwnRow
from counts.declare.spec import FORWARD, REVERSE, Chain, CountSpec, Table

ROOT = "root"


@dataclass(frozen=True)
class Route:
    """How a changed row of ``table`` maps back to ``target`` rows."""

    target: Table
    chain: Chain
    columns: frozenset[str]

    @property
    def table(self) -> Table:
        return self.chain[-1].child if self.chain else self.target

    @property
    def reached_by(self) -> str:
        return self.chain[-1].kind if self.chain else ROOT

    @property
    def on_insert_delete(self) -> bool:
        return self.reached_by == REVERSE

    @property
    def on_update(self) -> bool:
        return bool(self.columns - {self.table.pk}) or self.reached_by == REVERSE

    @property
    def operations(self) -> frozenset[str]:
        """Statement kinds on ``table`` that can change the counts this route leads to.

        The same rule the triggers are compiled from: a TRUNCATE matters whenever anything
        does, since it removes every row at once.
        """
        ops = {"insert", "delete"} if self.on_insert_delete else set()
        if self.on_update:
            ops.add("update")
        return frozenset(ops | {"truncate"}) if ops else frozenset()


@dataclass(frozen=True)
class Graph:
    """All cached counts and, for each table, the routes its changes travel."""

    specs: tuple[CountSpec, ...]
    routes: dict[str, tuple[Route, ...]]  # db_table -> routes
    #: What the layers above derive from this graph and keep as long as it lives (compiled
    #: recount statements): per graph, so a graph built for a migration state never serves
    #: another's.
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, specs: list[CountSpec]) -> Graph:
        reads: dict[Table, dict[Chain, set[str]]] = {}
        for spec in specs:
            per_target = reads.setdefault(spec.target, {})
            for chain, columns in spec.reads.items():
                per_target.setdefault(chain, set()).update(columns)
        routes: dict[str, list[Route]] = {}
        for target in sorted(reads):
            for chain in sorted(reads[target], key=lambda c: (len(c), c)):
                route = Route(target, chain, frozenset(reads[target][chain]))
                if route.on_insert_delete or route.on_update:
                    routes.setdefault(route.table.db_table, []).append(route)
        return cls(
            specs=tuple(specs),
            routes={table: tuple(rs) for table, rs in sorted(routes.items())},
        )

    @functools.cached_property
    def jobs(self) -> tuple:
        """Changes to settings (or to links on the way) that many items read
        (``counts.declare.jobs``)."""
        return build_jobs(self)

    @functools.cached_property
    def kinds(self) -> dict:
        """``{mark target: ItemKind}``: the counts kept through each junction table's items
        (``counts.declare.kinds``)."""
        return build_kinds(self)

    @functools.cached_property
    def targets(self) -> dict[str, Table]:
        """Every table holding cached counts, by model label."""
        return {s.target.label: s.target for s in self.specs}

    def specs_for(self, label: str) -> tuple[CountSpec, ...]:
        specs = tuple(s for s in self.specs if s.target.label == label)
        if not specs:
            raise UnknownTargetError(label)
        return specs

    def targets_of_table(self, db_table: str) -> frozenset[str]:
        """Labels of the targets a write to ``db_table`` can make dirty."""
        return frozenset(r.target.label for r in self.routes.get(db_table, ()))

    def targets_of_operation(self, db_table: str, operation: str) -> frozenset[str]:
        """What the marks an ``operation`` (``OPERATIONS``) on ``db_table`` writes are for:
        target labels, and item kinds (``item:<label>``) for counts kept through ledgers.

        This is what a worker is asked to drain after such a write. Inserting a project reaches
        no count (a table reached by a forward hop matters only when a column the counts read
        changes); inserting a capture writes deltas for its station and night, and no item
        mark (a new capture has no detection or capture set yet).
        """
        full = {s.key for s in self.specs if isinstance(s.mode, Full)}
        labels = set()
        for route in self.routes.get(db_table, ()):
            if operation in route.operations and any(
                s.key in full and s.target == route.target and route.chain in s.reads
                for s in self.specs
            ):
                labels.add(route.target.label)
        for spec in self.specs:
            mode = spec.mode
            if isinstance(mode, OwnRow) and mode.table.db_table == db_table:
                labels.add(spec.target.label)
            elif isinstance(mode, ItemCount):
                # The rows that name items: children, and the link's first rows; later
                # steps start link jobs, below.
                first = mode.link.first
                feeds = db_table in (mode.measure.child.db_table, first and first.table.db_table)
                own = mode.kind.db_table == db_table and mode.own_columns
                if feeds or (own and operation != "insert"):
                    labels.add(mode.mark_target)
        labels.update(
            job.kind
            for job in self.jobs
            if job.table.db_table == db_table
            and (operation in job.operations or operation == "truncate")
        )
        return frozenset(labels)


def app_graph() -> Graph:
    """The app's graph, sealed by ``counts.apps.CountsConfig.ready()`` once every model loaded.

    Read from Django's app registry, not imported from ``counts.apps``: the layers above the
    declarations take it once, where a pass or a drain starts, and pass it down.
    """
    return apps.get_app_config("counts").graph


__all__ = ["FORWARD", "OPERATIONS", "REVERSE", "ROOT", "Graph", "Route", "app_graph"]
