"""Jobs: a change to a setting (or to a link on the way to it) that many items read.

An occurrence counts when its score reaches its project's threshold, reached from it by
forward foreign keys (occurrence → deployment → project). A threshold change can flip every
occurrence of the project, so the writer cannot list the items (a trigger that collected
750k ids cost 213 ms). Instead the change's trigger writes **one job mark**: ``target`` is
the item kind, ``field`` names the job (``job:<hash>``: which table, which column, by which
path its items are reached), ``ids`` the changed rows and, when the column is the setting
compared by ``=``/``<``/``<=``/``>``/``>=``, ``payload`` holds ``[old, new]`` per row.

A drain **expands** a job into the items it can affect, in its own snapshot: the items reached
through those rows now, and for a setting change only those whose compared column lies
between old and new (an index range scan on ``(link, compared column)``: proportional to the
occurrences that can flip, not to the project). The items are then recomputed like any item
mark (``counts.run.items``), at the current setting.

**Link jobs** do the same for a link several rows from the items: an occurrence reaches the
capture sets of the captures its detections are on, so a capture joining or leaving a set
changes the sets of every occurrence with a detection on it. The membership rows' trigger
records their ``sourceimage_id`` values (old and new) in one job mark; the drain expands them
through the detections into occurrences, as for a setting. The argument below holds word for
word, with "a link on the way to the setting" read as "a link row on the way to the targets":
an item still reached through the recorded values is found by the join; one whose first step
moved away (a detection re-pointed) has an item mark of its own from that step's trigger.

Why that is exact (adding to the argument of ``counts.run.items``):

- *Marking is complete.* A change to an item's setting, or to a link on its way to the
  setting, writes a job whose expansion, in any snapshot after it committed, contains every
  item whose contribution the change can alter: the item still reached through the changed row
  is found by the join; an item moved away since has an item mark of its own (its own link
  column changed); an item whose compared value changed since has one too; and an item whose
  compared value lies outside ``[old, new]`` passes the filter at both settings alike.
- *Chains of changes* (0.5 → 0.6 → 0.5) need nothing more: each job covers its own interval,
  any item whose status differs between the setting its ledger was computed at and the
  current one lies in one of them, and a recompute always reads the current setting.
- *Recounts* treat the items a pending job expands to as stale (:func:`pending_items_sql`),
  like items with an item mark, so the recount formula stays exact while a job waits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from counts.base.mark import JOB_PREFIX
from counts.base.names import MARK_TABLE, literal, q
from counts.declare.modes import ItemCount, Setting
from counts.declare.spec import Table


@dataclass(frozen=True)
class Job:
    """Changes to ``column`` of ``table`` rows can alter the items of ``kind`` they reach."""

    kind: str  # item mark target, ``item:<label>``
    item: Table
    table: Table
    column: str
    joins: tuple[tuple[Table, str, str], ...]  # (table, its pk, column of the previous row)
    anchor: str  # column of the last joined row (or of the item) holding ``table``'s ids
    compared: str | None  # item column that a change of the setting bounds, if any
    cast: str | None
    #: A *link job*: rows of ``table`` are link rows several steps from the items (a capture
    #: set's membership rows, for occurrences reached through their detections). Their
    #: ``values`` column (old and new) is recorded on insert, delete, and an update of it or of
    #: ``column``; ``anchor`` holds those values. None: a setting job (ids of rows whose
    #: ``column`` changed, on update).
    values: str | None = None

    @property
    def key(self) -> str:
        shape = (self.kind, self.table.db_table, self.column, self.joins, self.anchor)
        if self.values:
            shape += (self.values,)
        return JOB_PREFIX + hashlib.sha1(repr(shape).encode()).hexdigest()[:12]

    @property
    def operations(self) -> frozenset[str]:
        """Statements on ``table`` that start it (a TRUNCATE marks every item instead)."""
        if self.values == self.table.pk:
            # No row names a new one yet (a row inserted earlier under a deferred constraint
            # marked its own item when it was written).
            return frozenset({"update", "delete"})
        if self.values:
            return frozenset({"insert", "update", "delete"})
        return frozenset({"update"})

    @property
    def range_index(self) -> tuple[str, str] | None:
        """The leading columns of the item-table index a ranged expansion walks: the item's
        link to the first row on the way, then the compared column (None: not ranged)."""
        if not self.compared:
            return None
        return (self.joins[0][2] if self.joins else self.anchor, self.compared)

    def _from(self) -> str:
        sql = f"{q(self.item.db_table)} r"
        prev = "r"
        for n, (table, pk, column) in enumerate(self.joins, start=1):
            sql += f" JOIN {q(table.db_table)} h{n} ON h{n}.{q(pk)} = {prev}.{q(column)}"
            prev = f"h{n}"
        return sql

    def _anchor(self) -> str:
        return f"{'h' + str(len(self.joins)) if self.joins else 'r'}.{q(self.anchor)}"

    def expand_sql(self, ranged: bool) -> str:
        """Item ids reached from the bound anchor ids (``%s::bigint[]``); ``ranged``: from one
        bound anchor id, only those whose compared column lies between the two bound values.

        One anchor per ranged query, its bounds bound as values: the planner then sees them
        and walks the ``(link, compared column)`` index per station; bounds read from an
        array in the same statement planned as a scan of every item (measured: 356 ms for a
        project's 36k candidates among 1.2M occurrences, against an index walk).
        """
        pk = f"r.{q(self.item.pk)}"
        if not ranged:
            return f"SELECT {pk} FROM {self._from()} WHERE {self._anchor()} = ANY(%s::bigint[])"
        return (
            f"SELECT {pk} FROM {self._from()} WHERE {self._anchor()} = %s"
            f" AND {self._between('%s', '%s')}"
        )

    def _between(self, old: str, new: str) -> str:
        """The compared column lies between the settings ``old`` and ``new`` (SQL text; each
        appears twice), whichever is larger."""
        lo, hi = (f"{v}::{self.cast}" for v in (old, new))
        return f"r.{q(self.compared)} BETWEEN least({lo}, {hi}) AND greatest({lo}, {hi})"

    def pending_items_sql(self, only: str = "true") -> str:
        """Item ids the job marks visible to the statement (and passing ``only``, a condition
        on the mark ``m``) expand to (stale items)."""
        where = f"m.target = {literal(self.kind)} AND m.field = {literal(self.key)} AND {only}"
        match = f"{self._anchor()} = a.id"
        if self.compared:
            old, new = "(m.payload->(a.n::int - 1)->>0)", "(m.payload->(a.n::int - 1)->>1)"
            match += (
                f" AND (m.payload IS NULL OR {old} IS NULL OR {new} IS NULL"
                f" OR {self._between(old, new)})"
            )
        # The gate, an uncorrelated EXISTS over the join (``OFFSET 0`` keeps it from being
        # pushed inside), is a one-time filter: with no such mark (nearly always) the join is
        # never started. Without it the planner, which cannot know the mark table holds none,
        # planned a parallel hash join over every item and paid its workers' start (5 ms) in
        # every recount, pending flag and exact read.
        gate = f"EXISTS (SELECT 1 FROM {MARK_TABLE} m WHERE {where})"
        return (
            f"SELECT j.id FROM (SELECT r.{q(self.item.pk)} AS id FROM {MARK_TABLE} m"
            f" CROSS JOIN LATERAL unnest(m.ids) WITH ORDINALITY a(id, n), {self._from()}"
            f" WHERE {where} AND {match} OFFSET 0) j WHERE {gate}"
        )

    def trigger_sql(self, operation: str = "update") -> str:
        """The trigger's statement: one job mark for the rows whose column changed (for a link
        job, the values of the rows inserted, deleted or re-linked)."""
        if self.values:
            return self._link_trigger_sql(operation)
        pk, col = q(self.table.pk), q(self.column)
        payload = (
            f"jsonb_agg(jsonb_build_array(o.{col}, n.{col}) ORDER BY n.{pk})"
            if self.compared
            else "NULL::jsonb"
        )
        return (
            f"INSERT INTO {MARK_TABLE} (target, field, ids, payload)"
            f" SELECT {literal(self.kind)}, {literal(self.key)},"
            f" array_agg(n.{pk} ORDER BY n.{pk}), {payload}"
            f" FROM new_rows n JOIN old_rows o ON o.{pk} = n.{pk}"
            f" WHERE o.{col} IS DISTINCT FROM n.{col} HAVING count(*) > 0;"
        )

    def _link_trigger_sql(self, operation: str) -> str:
        val = q(self.values)
        if operation == "update":
            # Versions of the rows whose link columns changed, old and new: a set difference
            # of the transition tables, which no concurrent writer can change.
            cols = ", ".join(q(c) for c in dict.fromkeys((self.table.pk, self.values, self.column)))
            rows = (
                f"(SELECT {cols} FROM new_rows EXCEPT SELECT {cols} FROM old_rows) UNION ALL"
                f" (SELECT {cols} FROM old_rows EXCEPT SELECT {cols} FROM new_rows)"
            )
            rows = f"SELECT c.{val} AS v FROM ({rows}) c"
        else:
            rows = f"SELECT {val} AS v FROM {'new_rows' if operation == 'insert' else 'old_rows'}"
        return (
            f"INSERT INTO {MARK_TABLE} (target, field, ids)"
            f" SELECT {literal(self.kind)}, {literal(self.key)},"
            f" array_agg(DISTINCT s.v ORDER BY s.v) FROM ({rows}) s"
            " WHERE s.v IS NOT NULL HAVING count(*) > 0;"
        )


def build_jobs(graph) -> tuple[Job, ...]:
    """Every job of the graph's item counts (links several steps from the items, settings
    reached by ``F()``, rows above the items their test reads), deduplicated."""
    found: dict[str, Job] = {}
    for spec in graph.specs:
        mode = spec.mode
        if not isinstance(mode, ItemCount):
            continue
        jobs = _link_jobs(mode)
        if mode.setting is not None:
            # Rows of each hop's table change: the link to the next row, or the setting itself.
            jobs += [
                _setting_job(mode, mode.setting, k) for k in range(1, len(mode.setting.hops) + 1)
            ]
        # A row above the items whose column their test reads (a shelf's name): only the last
        # hop, since a row moved under another (a shelf to another library) re-links its
        # items, which the link's own job covers.
        jobs += [_setting_job(mode, watch, len(watch.hops)) for watch in mode.watches]
        for job in jobs:
            found.setdefault(job.key, job)
    return tuple(found[k] for k in sorted(found))


def _setting_job(mode: ItemCount, setting: Setting, k: int) -> Job:
    """The job for changes to rows of the ``k``-th hop towards ``setting`` (1-based): their
    link to the next row, or, at the last hop, the setting's column itself."""
    hops = setting.hops
    last = k == len(hops)
    return Job(
        kind=mode.mark_target,
        item=mode.kind,
        table=hops[k - 1].child,
        column=setting.column if last else hops[k].column,
        joins=tuple((h.child, h.child.pk, h.column) for h in hops[: k - 1]),
        anchor=hops[k - 1].column,
        compared=setting.compared if last else None,
        cast=setting.cast if last else None,
    )


def _link_jobs(mode: ItemCount) -> list[Job]:
    """A job per link table after the first step of a link with ``via`` steps: a row there
    changes the targets of every item whose steps reach it (a capture joining a set changes
    the sets of each occurrence with a detection on it), which the writer cannot list."""
    steps = mode.link.steps
    jobs = []
    for k in range(1, len(steps)):
        # From the item to the step before: each join is ``(table, its column, previous one)``.
        joins, prev = [], mode.kind.pk
        for step in steps[:k]:
            joins.append((step.table, step.where, prev))
            prev = step.select
        jobs.append(
            Job(
                kind=mode.mark_target,
                item=mode.kind,
                table=steps[k].table,
                column=steps[k].select,
                joins=tuple(joins),
                anchor=prev,
                compared=None,
                cast=None,
                values=steps[k].where,
            )
        )
    return jobs


def jobs_by_key(graph) -> dict[str, Job]:
    return {job.key: job for job in graph.jobs}


def jobs_on(graph, table: Table) -> list[Job]:
    """The jobs a change to ``table`` can start."""
    return [job for job in graph.jobs if job.table == table]
