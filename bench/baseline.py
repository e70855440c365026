"""Hand-written set-based statements that compute what the engine's bulk paths compute.

The reconcile, rebuild and backfill sections measure ``counts.reconcile()``, ``counts.rebuild()``
and ``counts.operate.backfill.backfill()`` against these: the same values for the same rows, written
the plain way one would by hand for this domain, without the engine's machinery (no claims, no
marks, no credits, no lease). Like ``tests/truth.py`` they follow DESIGN.md §1 word for word and
share nothing with the engine's compiler but the ledger keys (``counts.declare.modes.ledger_key``):

- **targets**: per table, one ``SELECT`` (dry) or ``UPDATE … FROM`` (repair) joining the table
  to one ``GROUP BY`` per counted relation; the repair writes only the rows that differ and
  stamps ``counts_updated_at``, as the engine does;
- **ledgers**: per item kind, each item's state (``{"<ledger key>": [amount, target, …]}``,
  what ``counts.compile.item_sql.truth_sql`` defines) built by grouping detections and memberships
  per
  capture, or filtering counted occurrences, compared with ``counts_ledger`` by a ``FULL
  JOIN`` (dry) or written by one ``UPDATE``, one ``INSERT`` and one ``DELETE`` (repair);
- **multiplicities**: the (station, taxon) pairs of counted occurrences with their number,
  compared with or written to ``counts_multiplicity``.

Each comes in two shapes: **one statement** per table or kind over all of it, and **chunked**
with the engine's chunk sizes and transactions (items 5,000 per transaction, targets 1,000,
multiplicities 1,000 stations, each chunk a key range ``(lo, hi]`` found by keyset
pagination). Every transaction runs with the engine's own settings (``counts.engine`` on, so
the column guards let it write; JIT off), so what differs is the work, not the session.

On a database at rest (no marks pending) the truth here is exactly the state the engine keeps,
which the reconcile section checks every run: its dry pass and the engine's must agree on
whether anything drifted. What these statements leave out is what makes the engine's passes
safe beside live writers and drains: they lock nothing, ignore pending marks (the engine's
recount writes ``truth - pending - adjustment``), and a repair sets values rather than
crediting differences. So they are right only at rest, and the ratio engine ÷ baseline is the
price of that safety plus whatever the engine wastes, not waste alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connection, transaction

from counts.base.names import ENGINE_SETTING, LEDGER_TABLE
from counts.compile.item_sql import state_sql
from counts.declare.modes import ledger_key
from counts.run.multiplicity import TABLE as MULTIPLICITY_TABLE

THROUGH = "monitoring_sourceimagecollection_images"
CAPTURE_KIND = "item:monitoring.sourceimage"
OCCURRENCE_KIND = "item:monitoring.occurrence"
#: Chunk sizes of the engine's bulk passes (``counts.reconcile(chunk=1000)``: targets per
#: transaction, and five times that many items per transaction of the item pass).
TARGET_CHUNK = 1000
ITEM_CHUNK = 5000


def key(label: str, column: str) -> str:
    """The ledger key of ``label``'s count ``column`` (the engine's, so states compare)."""
    return ledger_key(f"{label}.{column}")


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in(column: str, lo: int | None, hi: int | None) -> str:
    """``column`` in ``(lo, hi]``; None for an open end."""
    terms = ["true" if lo is None else f"{column} > {int(lo)}"]
    if hi is not None:
        terms.append(f"{column} <= {int(hi)}")
    return " AND ".join(terms)


# --- the truth, by hand ------------------------------------------------------------------------

#: Occurrences whose score reaches the threshold of their own station's project.
COUNTED = (
    "SELECT o.id, o.deployment_id, o.event_id, o.determination_id, d.project_id"
    " FROM monitoring_occurrence o JOIN monitoring_deployment d ON d.id = o.deployment_id"
    " JOIN monitoring_project p ON p.id = d.project_id"
    " WHERE o.determination_score >= p.default_filters_score_threshold"
)


def _per_capture(where: str) -> str:
    """Valid and all detections per capture, for the captures ``where`` selects (over
    ``source_image_id``)."""
    return (
        "SELECT source_image_id AS id, count(*) FILTER (WHERE bbox IS NOT NULL) AS valid,"
        f" count(*) AS anyd FROM monitoring_detection WHERE {where} GROUP BY 1"
    )


@dataclass(frozen=True)
class Table:
    """A target table: its cached columns and its truth over a key range."""

    label: str
    table: str
    columns: tuple[str, ...]
    truth: Callable[[int | None, int | None], str]  # SELECT id, <columns> of rows in (lo, hi]


def _deployment(lo, hi) -> str:
    r = lambda c: _in(c, lo, hi)  # noqa: E731
    return (
        "SELECT t.id, coalesce(e.n, 0), coalesce(oc.n, 0), coalesce(c.n, 0), coalesce(dd.n, 0),"
        " coalesce(oc.taxa, 0) FROM monitoring_deployment t"
        " LEFT JOIN (SELECT deployment_id AS id, count(*) AS n FROM monitoring_event"
        f"  WHERE {r('deployment_id')} GROUP BY 1) e ON e.id = t.id"
        " LEFT JOIN (SELECT deployment_id AS id, count(*) AS n FROM monitoring_sourceimage"
        f"  WHERE {r('deployment_id')} GROUP BY 1) c ON c.id = t.id"
        " LEFT JOIN (SELECT si.deployment_id AS id, count(*) AS n FROM monitoring_detection d"
        "  JOIN monitoring_sourceimage si ON si.id = d.source_image_id"
        f"  WHERE d.bbox IS NOT NULL AND {r('si.deployment_id')} GROUP BY 1) dd ON dd.id = t.id"
        " LEFT JOIN (SELECT o.deployment_id AS id, count(*) AS n,"
        f"  count(DISTINCT o.determination_id) AS taxa FROM ({COUNTED}) o"
        f"  WHERE {r('o.deployment_id')} GROUP BY 1) oc ON oc.id = t.id"
        f" WHERE {r('t.id')}"
    )


def _event(lo, hi) -> str:
    r = lambda c: _in(c, lo, hi)  # noqa: E731
    return (
        "SELECT t.id, coalesce(c.n, 0), coalesce(dd.n, 0), coalesce(oc.n, 0),"
        " coalesce(oc.taxa, 0) FROM monitoring_event t"
        " LEFT JOIN (SELECT event_id AS id, count(*) AS n FROM monitoring_sourceimage"
        f"  WHERE {r('event_id')} GROUP BY 1) c ON c.id = t.id"
        " LEFT JOIN (SELECT si.event_id AS id, count(*) AS n FROM monitoring_detection d"
        "  JOIN monitoring_sourceimage si ON si.id = d.source_image_id"
        f"  WHERE d.bbox IS NOT NULL AND {r('si.event_id')} GROUP BY 1) dd ON dd.id = t.id"
        " LEFT JOIN (SELECT o.event_id AS id, count(*) AS n,"
        f"  count(DISTINCT o.determination_id) AS taxa FROM ({COUNTED}) o"
        f"  WHERE {r('o.event_id')} GROUP BY 1) oc ON oc.id = t.id"
        f" WHERE {r('t.id')}"
    )


def _capture(lo, hi) -> str:
    return (
        "SELECT t.id, coalesce(v.n, 0) FROM monitoring_sourceimage t"
        " LEFT JOIN (SELECT source_image_id AS id, count(*) AS n FROM monitoring_detection"
        f"  WHERE bbox IS NOT NULL AND {_in('source_image_id', lo, hi)} GROUP BY 1) v"
        f" ON v.id = t.id WHERE {_in('t.id', lo, hi)}"
    )


def _set_occurrences(where: str) -> str:
    """``SELECT set_id, occurrence_id, determination_id``: each counted occurrence with a
    detection on a capture of the set, once per (set, occurrence), for the sets ``where``
    selects (over ``m.sourceimagecollection_id``)."""
    return (
        "SELECT DISTINCT m.sourceimagecollection_id AS set_id, o.id AS occurrence_id,"
        f" o.determination_id FROM {THROUGH} m"
        " JOIN monitoring_detection d ON d.source_image_id = m.sourceimage_id"
        f" JOIN ({COUNTED}) o ON o.id = d.occurrence_id WHERE {where}"
    )


def _capture_set(lo, hi) -> str:
    r = lambda c: _in(c, lo, hi)  # noqa: E731
    return (
        "SELECT t.id, coalesce(m.n, 0), coalesce(m.valid, 0), coalesce(m.anyd, 0),"
        " coalesce(oc.n, 0), coalesce(oc.taxa, 0)"
        " FROM monitoring_sourceimagecollection t"
        " LEFT JOIN (SELECT m.sourceimagecollection_id AS id, count(*) AS n,"
        "  count(*) FILTER (WHERE x.valid > 0) AS valid, count(*) FILTER (WHERE x.anyd > 0) AS anyd"
        f"  FROM {THROUGH} m LEFT JOIN ({_per_capture('true')}) x ON x.id = m.sourceimage_id"
        f"  WHERE {r('m.sourceimagecollection_id')} GROUP BY 1) m ON m.id = t.id"
        " LEFT JOIN (SELECT set_id AS id, count(*) AS n, count(DISTINCT determination_id) AS taxa"
        f"  FROM ({_set_occurrences(r('m.sourceimagecollection_id'))}) so GROUP BY 1) oc"
        f" ON oc.id = t.id WHERE {r('t.id')}"
    )


def _project(lo, hi) -> str:
    return (
        "SELECT t.id, coalesce(oc.taxa, 0) FROM monitoring_project t"
        " LEFT JOIN (SELECT o.project_id AS id, count(DISTINCT o.determination_id) AS taxa"
        f"  FROM ({COUNTED}) o WHERE {_in('o.project_id', lo, hi)} GROUP BY 1) oc ON oc.id = t.id"
        f" WHERE {_in('t.id', lo, hi)}"
    )


TABLES = (
    Table(
        "monitoring.deployment",
        "monitoring_deployment",
        ("events_count", "occurrences_count", "captures_count", "detections_count", "taxa_count"),
        _deployment,
    ),
    Table(
        "monitoring.event",
        "monitoring_event",
        ("captures_count", "detections_count", "occurrences_count", "taxa_count"),
        _event,
    ),
    Table("monitoring.sourceimage", "monitoring_sourceimage", ("detections_count",), _capture),
    Table(
        "monitoring.sourceimagecollection",
        "monitoring_sourceimagecollection",
        (
            "source_images_count",
            "source_images_with_detections_count",
            "source_images_processed_count",
            "occurrences_count",
            "taxa_count",
        ),
        _capture_set,
    ),
    Table("monitoring.project", "monitoring_project", ("taxa_count",), _project),
)


def _states(entries: dict[str, tuple[str, str]], keys) -> tuple[str, str]:
    """``(state expression, "state is not empty" condition)`` from ``{ledger key: (condition,
    entry)}``, keeping only ``keys`` (all when None). The emptiness test reads the conditions,
    not the state: a filter on the built state is pushed into the scan and builds it twice,
    which costs more than the rest of the statement (jsonb building is the expensive part)."""
    kept = {k: v for k, v in entries.items() if keys is None or k in keys}
    # Each entry written as JSON text, the whole parsed once by the engine's own framing
    # (``state_sql``): a third of the cost of nesting jsonb_build_array in jsonb_build_object.
    built = [
        f"CASE WHEN {c} THEN {_lit(json.dumps(k) + ':[')} || {e} || ']' END"
        for k, (c, e) in kept.items()
    ]
    some = " OR ".join(f"({c})" for c, _e in kept.values()) or "false"
    return state_sql(built), some


CAPTURE_SETS_KEYS = (
    key("monitoring.sourceimagecollection", "source_images_with_detections_count"),
    key("monitoring.sourceimagecollection", "source_images_processed_count"),
)


def _capture_states(lo, hi, keys: tuple[str, ...] | None = None) -> str:
    """``SELECT item_id, state`` of the captures in ``(lo, hi]`` with a non-empty truth
    (``keys``: only those ledger keys' entries). A capture is worth its valid detections to its
    station, night and itself, and 1 to each of its sets when it has a valid detection (or any
    detection, for "processed")."""
    sets = "'1,' || array_to_string(s.ids, ',')"
    state, some = _states(
        {
            key("monitoring.deployment", "detections_count"): (
                "x.valid > 0",
                "x.valid || ',' || si.deployment_id",
            ),
            key("monitoring.event", "detections_count"): (
                "x.valid > 0 AND si.event_id IS NOT NULL",
                "x.valid || ',' || si.event_id",
            ),
            key("monitoring.sourceimage", "detections_count"): (
                "x.valid > 0",
                "x.valid || ',' || si.id",
            ),
            CAPTURE_SETS_KEYS[0]: ("x.valid > 0 AND s.ids IS NOT NULL", sets),
            CAPTURE_SETS_KEYS[1]: ("x.anyd > 0 AND s.ids IS NOT NULL", sets),
        },
        keys,
    )
    sets_join = ""
    if keys is None or set(keys) & set(CAPTURE_SETS_KEYS):
        sets_join = (
            " LEFT JOIN (SELECT sourceimage_id AS id, array_agg(sourceimagecollection_id"
            f" ORDER BY sourceimagecollection_id) AS ids FROM {THROUGH}"
            f" WHERE {_in('sourceimage_id', lo, hi)} GROUP BY 1) s ON s.id = si.id"
        )
    return (
        f"SELECT si.id AS item_id, {state} AS state"
        f" FROM ({_per_capture(_in('source_image_id', lo, hi))}) x"
        f" JOIN monitoring_sourceimage si ON si.id = x.id{sets_join}"
        f" WHERE {_in('si.id', lo, hi)} AND ({some})"
    )


def _occurrence_sets(lo, hi) -> str:
    """``SELECT id, ids``: per occurrence of ``(lo, hi]``, the sorted capture sets holding a
    capture it was detected on."""
    return (
        "SELECT d.occurrence_id AS id, array_agg(DISTINCT m.sourceimagecollection_id"
        " ORDER BY m.sourceimagecollection_id) AS ids FROM monitoring_detection d"
        f" JOIN {THROUGH} m ON m.sourceimage_id = d.source_image_id"
        f" WHERE {_in('d.occurrence_id', lo, hi)} GROUP BY 1"
    )


def _occurrence_states(lo, hi, keys: tuple[str, ...] | None = None) -> str:
    """``SELECT item_id, state`` of the counted occurrences in ``(lo, hi]``: 1 to their
    station, night and capture sets, and (target, taxon) for the distinct taxa of their
    station, night, project and capture sets."""
    sets = "'1,' || array_to_string(s.ids, ',')"
    determined = "o.determination_id IS NOT NULL"
    state, some = _states(
        {
            key("monitoring.deployment", "occurrences_count"): (
                "true",
                "'1,' || o.deployment_id",
            ),
            key("monitoring.event", "occurrences_count"): (
                "o.event_id IS NOT NULL",
                "'1,' || o.event_id",
            ),
            key("monitoring.deployment", "taxa_count"): (
                determined,
                "'1,' || o.deployment_id || ',' || o.determination_id",
            ),
            key("monitoring.event", "taxa_count"): (
                f"{determined} AND o.event_id IS NOT NULL",
                "'1,' || o.event_id || ',' || o.determination_id",
            ),
            key("monitoring.project", "taxa_count"): (
                determined,
                "'1,' || o.project_id || ',' || o.determination_id",
            ),
            key("monitoring.sourceimagecollection", "occurrences_count"): (
                "s.ids IS NOT NULL",
                sets,
            ),
            key("monitoring.sourceimagecollection", "taxa_count"): (
                f"{determined} AND s.ids IS NOT NULL",
                f"{sets} || ',' || o.determination_id",
            ),
        },
        keys,
    )
    return (
        f"SELECT o.id AS item_id, {state} AS state FROM ({COUNTED}) o"
        f" LEFT JOIN ({_occurrence_sets(lo, hi)}) s ON s.id = o.id"
        f" WHERE {_in('o.id', lo, hi)} AND ({some})"
    )


@dataclass(frozen=True)
class Kind:
    """An item kind: its ledger rows and its items' truth over a key range."""

    kind: str
    table: str
    states: Callable[..., str]


KINDS = (
    Kind(OCCURRENCE_KIND, "monitoring_occurrence", _occurrence_states),
    Kind(CAPTURE_KIND, "monitoring_sourceimage", _capture_states),
)


@dataclass(frozen=True)
class Pairs:
    """A distinct count's multiplicities: its ledger key, the table its targets are rows of,
    and ``SELECT target_id, value, n`` (the counted occurrences per target and taxon) over a
    range of target ids."""

    key: str
    table: str
    truth: Callable[[int | None, int | None], str]


def _taxa(column: str) -> Callable[[int | None, int | None], str]:
    """Counted, determined occurrences per (``column`` of the occurrence, taxon)."""
    return lambda lo, hi: (
        f"SELECT {column} AS target_id, determination_id AS value, count(*)::int AS n"
        f" FROM ({COUNTED}) o WHERE determination_id IS NOT NULL AND {column} IS NOT NULL"
        f" AND {_in(column, lo, hi)} GROUP BY 1, 2"
    )


def _set_taxa(lo, hi) -> str:
    """Counted, determined occurrences per (capture set, taxon)."""
    where = _in("m.sourceimagecollection_id", lo, hi)
    return (
        "SELECT set_id AS target_id, determination_id AS value, count(*)::int AS n"
        f" FROM ({_set_occurrences(where)}) so WHERE determination_id IS NOT NULL GROUP BY 1, 2"
    )


PAIRS = (
    Pairs(
        key("monitoring.deployment", "taxa_count"), "monitoring_deployment", _taxa("deployment_id")
    ),
    Pairs(key("monitoring.event", "taxa_count"), "monitoring_event", _taxa("event_id")),
    Pairs(key("monitoring.project", "taxa_count"), "monitoring_project", _taxa("project_id")),
    Pairs(
        key("monitoring.sourceimagecollection", "taxa_count"),
        "monitoring_sourceimagecollection",
        _set_taxa,
    ),
)


# --- the statements: dry (count the differences) and repair (write them) ------------------------


def _distinct(a: str, b: str, columns) -> str:
    return (
        "("
        + ", ".join(f"{a}.{c}" for c in columns)
        + ") IS DISTINCT FROM ("
        + ", ".join(f"{b}.{c}" for c in columns)
        + ")"
    )


def check_table(t: Table, lo=None, hi=None) -> str:
    """One row: (rows compared, rows whose stored counts differ from the truth)."""
    names = ", ".join(t.columns)
    return (
        f"SELECT count(*), count(*) FILTER (WHERE {_distinct('s', 'f', t.columns)})"
        f" FROM {t.table} s JOIN ({t.truth(lo, hi)}) f(id, {names}) ON f.id = s.id"
    )


def repair_table(t: Table, lo=None, hi=None) -> str:
    """Write the truth into the rows whose stored counts differ (rowcount: those rows)."""
    names = ", ".join(t.columns)
    sets = ", ".join(f"{c} = f.{c}" for c in t.columns)
    return (
        f"UPDATE {t.table} s SET {sets}, counts_updated_at = statement_timestamp()"
        f" FROM ({t.truth(lo, hi)}) f(id, {names})"
        f" WHERE f.id = s.id AND {_distinct('s', 'f', t.columns)}"
    )


def _ledger_diff(k: Kind, lo, hi) -> str:
    """Items of ``(lo, hi]`` whose ledger differs from the truth, and empty ledgers:
    ``item_id, old, new`` (NULL: no ledger row / nothing to credit)."""
    ledger = (
        f"SELECT item_id, state FROM {LEDGER_TABLE} WHERE kind = {_lit(k.kind)}"
        f" AND {_in('item_id', lo, hi)}"
    )
    return (
        f"SELECT coalesce(t.item_id, l.item_id) AS item_id, l.state AS old, t.state AS new"
        f" FROM ({k.states(lo, hi)}) t FULL JOIN ({ledger}) l ON l.item_id = t.item_id"
        " WHERE coalesce(t.state, '{}') IS DISTINCT FROM coalesce(l.state, '{}')"
        " OR l.state = '{}'"
    )


def check_ledger(k: Kind, lo=None, hi=None) -> str:
    """One row: (items compared — with a ledger or a non-empty truth —, items differing)."""
    ledger = (
        f"SELECT item_id, state FROM {LEDGER_TABLE} WHERE kind = {_lit(k.kind)}"
        f" AND {_in('item_id', lo, hi)}"
    )
    return (
        "SELECT count(*), count(*) FILTER (WHERE coalesce(t.state, '{}')"
        " IS DISTINCT FROM coalesce(l.state, '{}'))"
        f" FROM ({k.states(lo, hi)}) t FULL JOIN ({ledger}) l ON l.item_id = t.item_id"
    )


def repair_ledger(k: Kind, lo=None, hi=None) -> str:
    """Rewrite the ledgers that differ, insert the missing, delete those with no truth (and
    empty ones); one row: the ledgers written."""
    kind = _lit(k.kind)
    return (
        f"WITH d AS MATERIALIZED ({_ledger_diff(k, lo, hi)}),"
        f" u AS (UPDATE {LEDGER_TABLE} l SET state = d.new FROM d WHERE l.kind = {kind}"
        "  AND l.item_id = d.item_id AND d.old IS NOT NULL AND d.new IS NOT NULL RETURNING 1),"
        f" i AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        f"  SELECT {kind}, item_id, new FROM d WHERE old IS NULL RETURNING 1),"
        f" x AS (DELETE FROM {LEDGER_TABLE} l WHERE l.kind = {kind} AND {_in('l.item_id', lo, hi)}"
        "  AND l.item_id IN (SELECT item_id FROM d WHERE new IS NULL)"
        "  RETURNING 1)"
        " SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM i) + (SELECT count(*) FROM x)"
    )


def _stored_pairs(p: Pairs, lo, hi) -> str:
    return (
        f"SELECT target_id, value, n FROM {MULTIPLICITY_TABLE} WHERE key = {_lit(p.key)}"
        f" AND {_in('target_id', lo, hi)}"
    )


def _pairs_diff(p: Pairs, lo, hi) -> str:
    return (
        "SELECT coalesce(t.target_id, m.target_id) AS target_id,"
        " coalesce(t.value, m.value) AS value, t.n AS new, m.n AS old"
        f" FROM ({p.truth(lo, hi)}) t FULL JOIN ({_stored_pairs(p, lo, hi)}) m"
        " ON m.target_id = t.target_id AND m.value = t.value"
        " WHERE coalesce(t.n, 0) <> coalesce(m.n, 0) OR m.n = 0"
    )


def check_pairs(p: Pairs, lo=None, hi=None) -> str:
    """One row: (pairs compared, pairs whose multiplicity differs from the truth)."""
    return (
        "SELECT count(*), count(*) FILTER (WHERE coalesce(t.n, 0) <> coalesce(m.n, 0)"
        f" OR m.n = 0) FROM ({p.truth(lo, hi)}) t FULL JOIN ({_stored_pairs(p, lo, hi)}) m"
        " ON m.target_id = t.target_id AND m.value = t.value"
    )


def repair_pairs(p: Pairs, lo=None, hi=None) -> str:
    k = _lit(p.key)
    return (
        f"WITH d AS MATERIALIZED ({_pairs_diff(p, lo, hi)}),"
        f" w AS (INSERT INTO {MULTIPLICITY_TABLE} AS m (key, target_id, value, n)"
        f"  SELECT {k}, target_id, value, new FROM d WHERE new IS NOT NULL"
        "  ON CONFLICT (key, target_id, value) DO UPDATE SET n = EXCLUDED.n RETURNING 1),"
        f" x AS (DELETE FROM {MULTIPLICITY_TABLE} m USING d WHERE m.key = {k}"
        "  AND m.target_id = d.target_id AND m.value = d.value AND d.new IS NULL RETURNING 1)"
        " SELECT (SELECT count(*) FROM w) + (SELECT count(*) FROM x)"
    )


# --- running a pass ---------------------------------------------------------------------------


@dataclass
class Pass:
    """What one baseline pass found (dry) or wrote (repair), and where its time went."""

    dry: bool
    chunked: bool
    checked: int = 0  # target rows compared
    drifted_rows: int = 0  # target rows that differed
    ledgers_checked: int = 0
    ledgers_drifted: int = 0
    pairs_drifted: int = 0
    transactions: int = 0
    seconds: float = 0.0
    phases_s: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "ledgers_checked": self.ledgers_checked,
            "ledgers_drifted": self.ledgers_drifted,
            "pairs_drifted": self.pairs_drifted,
            "transactions": self.transactions,
            "seconds": round(self.seconds, 3),
            "phases_s": {k: round(v, 3) for k, v in self.phases_s.items()},
        }


def _settings(cursor) -> None:
    """The engine transaction's settings: cached columns writable, JIT off."""
    cursor.execute(
        "SELECT set_config(%s, 'on', true), set_config('jit', 'off', true)", [ENGINE_SETTING]
    )


def _bounds(table: str, column: str, chunk: int | None):
    """``(lo, hi]`` ranges of ``chunk`` keys of ``table`` (one open range when None); the last
    range is open, so rows beyond the last key (orphan ledgers) are covered."""
    if chunk is None:
        yield None, None
        return
    lo = None
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {column} FROM {table} WHERE {_in(column, lo, None)}"
                f" ORDER BY {column} OFFSET %s LIMIT 1",
                [chunk - 1],
            )
            row = cursor.fetchone()
        hi = None if row is None else row[0]
        yield lo, hi
        if hi is None:
            return
        lo = hi


def _run(sql: str) -> tuple:
    with transaction.atomic(), connection.cursor() as cursor:
        _settings(cursor)
        cursor.execute(sql)
        return cursor.fetchone() if cursor.description else (cursor.rowcount,)


def run_pass(dry: bool, chunked: bool) -> Pass:
    """Ledgers of both item kinds, the (station, taxon) multiplicities, then every target
    table: compared (``dry``) or repaired, in one statement each or in the engine's chunks."""
    report = Pass(dry=dry, chunked=chunked)
    started = time.perf_counter()
    items = ITEM_CHUNK if chunked else None
    targets = TARGET_CHUNK if chunked else None
    for k in KINDS:
        mark = time.perf_counter()
        for lo, hi in _bounds(k.table, "id", items):
            if dry:
                checked, drifted = _run(check_ledger(k, lo, hi))
                report.ledgers_checked += checked
            else:
                (drifted,) = _run(repair_ledger(k, lo, hi))
            report.ledgers_drifted += drifted
            report.transactions += 1
        report.phases_s[k.kind] = time.perf_counter() - mark
    mark = time.perf_counter()
    for p in PAIRS:
        for lo, hi in _bounds(p.table, "id", targets):
            if dry:
                _pairs_n, drifted = _run(check_pairs(p, lo, hi))
            else:
                (drifted,) = _run(repair_pairs(p, lo, hi))
            report.pairs_drifted += drifted
            report.transactions += 1
    report.phases_s["multiplicities"] = time.perf_counter() - mark
    for t in TABLES:
        mark = time.perf_counter()
        for lo, hi in _bounds(t.table, "id", targets):
            if dry:
                checked, drifted = _run(check_table(t, lo, hi))
            else:
                (drifted,) = _run(repair_table(t, lo, hi))
                checked = None
            report.drifted_rows += drifted
            report.transactions += 1
            if checked is not None:
                report.checked += checked
        report.phases_s[t.label] = time.perf_counter() - mark
    report.seconds = time.perf_counter() - started
    if not dry:  # (a repair compares without counting; untimed)
        report.checked = target_rows()
    return report


def target_rows() -> int:
    """Rows in the four target tables: what a full pass checks."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + " + ".join(f"(SELECT count(*) FROM {t.table})" for t in TABLES))
        return cursor.fetchone()[0]
