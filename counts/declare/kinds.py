"""Item kinds: the counts kept through one junction table's items, and what feeds them.

Which items exist and which counts each credits is a fact of the declarations, so it is built
with the graph (``Graph.kinds``) and passed; the SQL that reads an item's truth is
``counts.compile.item_sql``, and what a drain does with it ``counts.run.items``. Why crediting
items keeps counts exact is ``docs/engine.md`` §2.1-§2.3.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from counts.base.mark import ITEM_PREFIX
from counts.declare.modes import ItemCount, Link, Measure, ledger_key
from counts.declare.spec import Table


@dataclass(frozen=True)
class Part:
    """One item count: where its credits go and how an item is measured."""

    key: str  # ledger key
    label: str  # target model
    column: str  # cached column
    link: Link
    measure: Measure
    #: For a distinct count: the item column whose values are counted. Its ledger entries are
    #: ``[1, target, value]`` and credit a multiplicity (``counts.run.multiplicity``), not a target.
    distinct: str | None = None
    #: The setting its measure compares with (``counts.declare.modes.Setting``), if any.
    setting: object = None


@dataclass(frozen=True)
class ItemKind:
    """The item counts that share one junction table."""

    table: Table
    parts: tuple[Part, ...]
    #: Changes to settings its items read, or to links on the way (``counts.declare.jobs``).
    jobs: tuple = ()

    @property
    def mark_target(self) -> str:
        return ITEM_PREFIX + self.table.label

    def parts_for(self, label: str) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.label == label)

    def keys_for(self, label: str) -> list[str]:
        """The ledger keys of its counts on ``label``: what a lease, an exact read or a pending
        flag of that model names (``counts.operate.lease``)."""
        return [p.key for p in self.parts_for(label)]

    @property
    def parts_by_key(self) -> dict[str, Part]:
        """Its counts by ledger key: how a ledger entry is read back."""
        return {p.key: p for p in self.parts}

    def only(self, keys) -> ItemKind:
        """The same kind with only the counts of ledger ``keys``: what a pass filling some
        entries reads (a new count's backfill builds its own entries, not every other count's
        of the kind: a capture's sets for a count of its detections)."""
        wanted = set(keys)
        return replace(self, parts=tuple(p for p in self.parts if p.key in wanted))

    def summed_parts(self, label: str) -> tuple[Part, ...]:
        """The counts of ``label`` that are sums of credits (all but distinct counts)."""
        return tuple(p for p in self.parts_for(label) if not p.distinct)


def build_kinds(graph) -> dict[str, ItemKind]:
    """``{mark target: ItemKind}`` for every item count of the graph."""
    parts: dict[Table, list[Part]] = defaultdict(list)
    for spec in graph.specs:
        if isinstance(spec.mode, ItemCount):
            m = spec.mode
            parts[m.kind].append(
                Part(
                    ledger_key(spec.key),
                    spec.target.label,
                    spec.column,
                    m.link,
                    m.measure,
                    m.distinct,
                    m.setting,
                )
            )
    all_jobs = graph.jobs
    kinds = {}
    for table, ps in sorted(parts.items()):
        target = ITEM_PREFIX + table.label
        kinds[target] = ItemKind(table, tuple(ps), tuple(j for j in all_jobs if j.kind == target))
    return kinds


def kinds_feeding(graph, label: str) -> list[ItemKind]:
    return [k for k in graph.kinds.values() if k.parts_for(label)]
