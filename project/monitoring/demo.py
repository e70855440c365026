"""Demo data for countdown: a deterministic plan in Python, bulk loaded by set-based SQL.

Why this shape: ``seed_demo --scale 1000000`` must write ~5·10⁶ rows in minutes on a small
machine, so no row exists as a Python object. Python plans only the few thousand rows that carry
names and dates (projects, stations, nights, taxa, capture sets) with ``random.Random(seed)``;
PostgreSQL generates the millions (captures, detections, occurrences, set membership) with
``generate_series``, drawing every random choice from ``hashtextextended(path, seed)``. A row's
fate is then a pure function of its own path and the seed: the same seed gives the same data
whatever the ids, statement order or chunking.

Each SQL statement covers one station, so the count triggers write a handful of marks per
statement and the progress bar moves. Loading happens in one transaction (see
:func:`load`); the caller brings the cached counts up to date afterwards.

Shape of the data (fractions of captures; see :data:`PROJECTS` and :func:`collection_plans`):

- 35% unprocessed (no detection), 20% processed with nothing found (one null-bbox marker),
  45% with 1-5 valid detections (10% of those also carry a marker from a second pipeline run);
- 92% of valid detections belong to an occurrence; occurrence scores are uniform over
  0.00-1.00 in steps of 0.01 (so some equal a threshold exactly), 4% have no score and 5% no
  determination; taxa are Zipf-like (a few common species, a long tail);
- 3% of captures are daytime test shots outside any night (``event`` NULL).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from django.db import connection
from django.utils.text import slugify

#: (name, score threshold, share of captures, station places). Thresholds differ on purpose:
#: the same score spread counts differently in each project.
PROJECTS = (
    ("Vermont Atlas of Life: moths", 0.5, 0.6, ("Burlington", "Shelburne", "Craftsbury")),
    ("Panama Light Traps", 0.8, 0.3, ("Barro Colorado", "Gamboa", "Soberania")),
    ("Quebec Pollinator Watch", 0.3, 0.1, ("Mont Saint-Hilaire", "Gatineau")),
)
#: Demo projects anyone may read through the API without signing in (the others need a login:
#: the admin user is a superuser), so the API address ``bin/run`` prints shows data at once.
PUBLIC_PROJECTS = frozenset({"Quebec Pollinator Watch"})
#: Genera and epithets combined into taxon names (unique by construction); word lists read
#: better as one string than as 54 one-per-line literals.
GENERA = (  # noqa: SIM905
    "Actias Antheraea Automeris Catocala Citheronia Clostera Crambus Datana Dryocampa Eacles "
    "Euchlaena Halysidota Hemaris Herpetogramma Heterocampa Hyalophora Hypena Hypoprepia Idia "
    "Lambdina Lochmaeus Lophocampa Malacosoma Nadata Nemoria Orgyia Paonias Pyrausta Schizura "
    "Smerinthus Spilosoma Sphinx Tolype Zale"
).split()
EPITHETS = (  # noqa: SIM905
    "americana luna io polyphemus cecropia imperialis regalis rubicunda virginica fasciata "
    "caryae tessellaris ilia concinna unicornis gemina kalmiae modesta lunata aeliaria"
).split()
#: Average captures per night at one station.
CAPTURES_PER_NIGHT = 400
#: Share of captures taken in daylight, outside any night.
DAYTIME_SHARE = 0.03
#: Night length: 19:30 + up to an hour, for 10.5 hours.
NIGHT = timedelta(hours=10, minutes=30)
#: Daytime bursts start at 11:00 and end before the night begins.
DAYTIME = timedelta(hours=8)
FIRST_DAY = date(2023, 5, 1)


@dataclass
class NightPlan:
    start: datetime
    end: datetime | None
    captures: int
    id: int | None = None  # filled in once inserted


@dataclass
class DeploymentPlan:
    project: int  # index into PROJECTS
    name: str
    slug: str
    nights: list[NightPlan]
    #: (first capture time, captures) of daytime bursts (11:00 onwards) that belong to no night.
    days: list[tuple[datetime, int]]
    id: int | None = None

    @property
    def captures(self) -> int:
        return sum(n.captures for n in self.nights) + sum(n for _, n in self.days)


@dataclass
class CollectionPlan:
    project: int
    name: str
    #: SQL condition on ``s`` (a capture of the project's stations); ``%(seed)s`` is bound.
    where: str
    params: dict = field(default_factory=dict)


@dataclass
class Plan:
    scale: int
    seed: int
    deployments: list[DeploymentPlan]
    taxa: list[str]


def split(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into parts proportional to ``weights`` that sum to exactly ``total``."""
    whole = sum(weights)
    cuts, acc = [], 0.0
    for w in weights:
        acc += w
        cuts.append(round(total * acc / whole))
    return [b - a for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]


def make_plan(scale: int, seed: int) -> Plan:
    """Everything but the bulk rows, derived from ``scale`` and ``seed`` only."""
    rng = random.Random(seed)
    stations = max(len(PROJECTS) + 1, min(300, round(math.sqrt(scale) / 20)))
    per_project = split(stations - len(PROJECTS), [p[2] for p in PROJECTS])
    per_project = [n + 1 for n in per_project]  # every project has a station
    captures = split(scale, [p[2] for p in PROJECTS])
    deployments: list[DeploymentPlan] = []
    for p, (_name, _threshold, _share, places) in enumerate(PROJECTS):
        weights = [0.6 + rng.random() for _ in range(per_project[p])]
        for k, total in enumerate(split(captures[p], weights)):
            name = f"{places[k % len(places)]} {k // len(places) + 1:02d}"
            deployments.append(_deployment(rng, p, name, total, ongoing=k == 0))
    taxa = [f"{g} {e}" for g in GENERA for e in EPITHETS]
    rng.shuffle(taxa)
    taxa = taxa[: max(30, min(len(taxa), scale // 100))]  # most common first
    return Plan(scale=scale, seed=seed, deployments=deployments, taxa=taxa)


def _deployment(
    rng: random.Random, project: int, name: str, total: int, ongoing: bool
) -> DeploymentPlan:
    daytime = round(total * DAYTIME_SHARE)
    at_night = total - daytime
    n_nights = max(1, min(400, round(at_night / CAPTURES_PER_NIGHT)))
    day = FIRST_DAY + timedelta(days=rng.randrange(60))
    nights: list[NightPlan] = []
    for size in split(at_night, [0.3 + rng.random() for _ in range(n_nights)]):
        day += timedelta(days=1 if rng.random() < 0.8 else rng.randrange(2, 5))
        start = datetime(day.year, day.month, day.day, 19, 30, tzinfo=UTC)
        start += timedelta(minutes=rng.randrange(60))
        nights.append(NightPlan(start=start, end=start + NIGHT, captures=size))
    if ongoing:
        nights[-1].end = None  # the station is still out tonight
    # Daytime test bursts, each on its own date, so no timestamp (and no path) repeats.
    n_days = min(len(nights), math.ceil(daytime / 200))
    dates = sorted(rng.sample(range(len(nights)), n_days))
    days = [
        (nights[i].start.replace(hour=11, minute=0), size)
        for i, size in zip(dates, split(daytime, [1.0] * n_days), strict=True)
    ]
    return DeploymentPlan(project=project, name=name, slug=slugify(name), nights=nights, days=days)


def collection_plans(plan: Plan) -> list[CollectionPlan]:
    """Capture sets from empty to half of every capture, a few ≥ 10% of the scale."""
    share = [sum(d.captures for d in plan.deployments if d.project == p) for p in range(3)]
    first = next(d for d in plan.deployments if d.project == 0)
    night = next(d for d in plan.deployments if d.project == 2).nights[0]
    weekly = [n.id for d in plan.deployments if d.project == 0 for n in d.nights[::7]]
    review = min(1.0, 100 / max(1, share[0]))
    return [
        CollectionPlan(
            0, "Half of all captures", _sample(1), {"f": _frac(plan.scale / 2, share[0])}
        ),
        CollectionPlan(0, "Random sample 20%", _sample(2), {"f": _frac(plan.scale / 5, share[0])}),
        CollectionPlan(0, f"{first.name}: every night", "s.deployment_id = %(d)s", {"d": first.id}),
        CollectionPlan(0, "Weekly nights", "s.event_id = ANY(%(e)s)", {"e": weekly}),
        CollectionPlan(0, "Review queue", _sample(3), {"f": review}),
        CollectionPlan(0, "Empty set", "FALSE"),
        CollectionPlan(1, "Season 2023: everything", "TRUE"),
        CollectionPlan(1, "Daytime test shots", "s.event_id IS NULL"),
        CollectionPlan(1, "Random sample 10%", _sample(4), {"f": 0.1}),
        CollectionPlan(2, "All captures", "TRUE"),
        CollectionPlan(2, "One night", "s.event_id = %(e)s", {"e": night.id}),
        # Captures but no occurrence, so no taxon: the occurrence counts of a set can be 0
        # while its image counts are not.
        CollectionPlan(
            2,
            "Unprocessed captures",
            "NOT EXISTS (SELECT 1 FROM monitoring_detection d WHERE d.source_image_id = s.id)",
        ),
    ]


def _frac(wanted: float, available: int) -> float:
    return min(1.0, wanted / max(1, available))


def _sample(salt: int) -> str:
    return f"{unit(f'hashtextextended(s.path, %(seed)s + {salt})', 0)} < %(f)s"


def unit(hash_sql: str, k: int) -> str:
    """SQL for a uniform float in [0, 1) from 16-bit field ``k`` (0-3) of a 64-bit hash."""
    return f"((({hash_sql} >> {16 * k}) & 65535)::float8 / 65536.0)"


# --- Loading -----------------------------------------------------------------------------------

_CAPTURES = """
INSERT INTO monitoring_sourceimage
    (created_at, updated_at, deployment_id, event_id, "timestamp", path, detections_count)
SELECT now(), now(), %(dep)s, p.event_id, p.start + p.step * k,
       %(slug)s || '/' || to_char(p.start + p.step * k, 'YYYY-MM-DD/YYYYMMDD"-"HH24MISS')
           || '-' || lpad(k::text, 4, '0') || '.jpg',
       0
FROM unnest(%(events)s::bigint[], %(starts)s::timestamptz[], %(steps)s::interval[],
            %(sizes)s::int[]) AS p(event_id, start, step, n)
CROSS JOIN LATERAL generate_series(0, p.n - 1) AS k
"""

# Per capture: kind (u0), number of valid detections (u1), extra null marker (u2).
# Per slot j (0 = null marker, 1.. = valid detections): h1 → bbox, detection score, whether it
# joins an occurrence; h2 → determination, its presence, the score and its presence.
_DETECTIONS = f"""
WITH img AS (
    SELECT s.id, s.deployment_id, s.event_id, s.path,
           hashtextextended(s.path, %(seed)s) AS h
    FROM monitoring_sourceimage s WHERE s.deployment_id = %(dep)s
), slots AS MATERIALIZED (
    SELECT img.id AS image_id, img.deployment_id, img.event_id, j, x.h1, x.h2,
           CASE WHEN j > 0 AND {unit("x.h1", 3)} < 0.92
                THEN nextval(%(occ_seq)s::regclass) END AS occ_id
    FROM img
    CROSS JOIN LATERAL generate_series(
        CASE WHEN {unit("img.h", 0)} < 0.55 OR {unit("img.h", 2)} < 0.1 THEN 0 ELSE 1 END,
        CASE WHEN {unit("img.h", 0)} < 0.55 THEN 0 ELSE 1 + floor({unit("img.h", 1)} * 5)::int END
    ) AS j
    CROSS JOIN LATERAL (
        SELECT hashtextextended(img.path || ':' || j, %(seed)s) AS h1,
               hashtextextended(img.path || ':' || j, %(seed)s + 1) AS h2
    ) x
    WHERE {unit("img.h", 0)} >= 0.35
), occ AS (
    INSERT INTO monitoring_occurrence (created_at, updated_at, id, deployment_id, event_id,
                                       determination_id, determination_score)
    SELECT now(), now(), occ_id, deployment_id, event_id,
           CASE WHEN {unit("h2", 0)} >= 0.05
                THEN (%(taxa)s::bigint[])[1 + floor(power({unit("h2", 1)}, 2.5) * %(n_taxa)s)::int]
           END,
           CASE WHEN {unit("h2", 2)} >= 0.04 THEN round({unit("h2", 3)} * 100) / 100 END
    FROM slots WHERE occ_id IS NOT NULL
    RETURNING 1
), det AS (
    INSERT INTO monitoring_detection (created_at, updated_at, source_image_id, bbox,
                                      occurrence_id, score)
    SELECT now(), now(), image_id,
           CASE WHEN j > 0 THEN jsonb_build_array(
               floor({unit("h1", 0)} * 3800)::int, floor({unit("h1", 1)} * 2600)::int,
               floor({unit("h1", 0)} * 3800)::int + 24 + floor({unit("h1", 2)} * 300)::int,
               floor({unit("h1", 1)} * 2600)::int + 24 + floor({unit("h1", 2)} * 260)::int)
           END,
           occ_id,
           CASE WHEN j > 0 THEN round({unit("h1", 2)} * 1000) / 1000 END
    FROM slots
    RETURNING 1
)
SELECT (SELECT count(*) FROM det), (SELECT count(*) FROM occ)
"""

_MEMBERS = """
INSERT INTO monitoring_sourceimagecollection_images (sourceimagecollection_id, sourceimage_id)
SELECT %(collection)s, s.id FROM monitoring_sourceimage s
WHERE s.deployment_id = ANY(%(deps)s) AND ({where})
"""


def _insert_returning(cursor, sql: str, params: dict) -> list[tuple]:
    cursor.execute(sql, params)
    return cursor.fetchall()


def load(plan: Plan, progress) -> dict[str, int]:
    """Insert the plan's rows; call inside a transaction. Returns rows written per table.

    ``progress(captures)`` is called after each station's captures are in.
    """
    rows = dict.fromkeys(
        ("project", "deployment", "event", "capture", "detection", "occurrence", "taxon", "set"),
        0,
    )
    rows["membership"] = 0
    with connection.cursor() as cursor:
        # Check foreign keys per statement rather than queueing millions of checks to COMMIT.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("SELECT pg_get_serial_sequence('monitoring_occurrence', 'id')")
        occ_seq = cursor.fetchone()[0]
        project_ids = _insert_projects(cursor)
        rows["project"] = len(project_ids)
        rows["taxon"], taxa = _insert_taxa(cursor, plan.taxa)
        for d in plan.deployments:
            d.id = _insert_deployment(cursor, d, project_ids[d.project])
            _load_station(cursor, d, rows, seed=plan.seed, occ_seq=occ_seq, taxa=taxa)
            progress(d.captures)
        for c in collection_plans(plan):
            rows["membership"] += _insert_collection(cursor, plan, c, project_ids[c.project])
            rows["set"] += 1
    return rows


def _insert_projects(cursor) -> list[int]:
    """One row per :data:`PROJECTS` entry; their ids in that order."""
    return [
        _insert_returning(
            cursor,
            "INSERT INTO monitoring_project (created_at, updated_at, name,"
            " default_filters_score_threshold, is_public)"
            " VALUES (now(), now(), %(n)s, %(t)s, %(public)s) RETURNING id",
            {"n": name, "t": threshold, "public": name in PUBLIC_PROJECTS},
        )[0][0]
        for name, threshold, _share, _places in PROJECTS
    ]


def _insert_taxa(cursor, names: list[str]) -> tuple[int, list[int]]:
    """Insert the taxa not there yet; returns (how many were new, every name's id in order)."""
    cursor.execute(
        "INSERT INTO monitoring_taxon (created_at, updated_at, name)"
        " SELECT now(), now(), n FROM unnest(%(names)s::text[]) n"
        " ON CONFLICT (name) DO NOTHING",
        {"names": names},
    )
    inserted = cursor.rowcount
    cursor.execute(
        "SELECT t.id FROM unnest(%(names)s::text[]) WITH ORDINALITY AS n(name, i)"
        " JOIN monitoring_taxon t ON t.name = n.name ORDER BY n.i",
        {"names": names},
    )
    return inserted, [r[0] for r in cursor.fetchall()]


def _load_station(cursor, d: DeploymentPlan, rows: dict, *, seed, occ_seq, taxa) -> None:
    """One station's nights, captures, detections and occurrences (its row is in already);
    adds what it wrote to ``rows``."""
    rows["deployment"] += 1
    rows["event"] += len(d.nights)
    groups = [(n.id, n.start, _step(n.captures), n.captures) for n in d.nights]
    groups += [(None, t, _step(n, DAYTIME), n) for t, n in d.days]
    cursor.execute(
        _CAPTURES,
        {
            "dep": d.id,
            "slug": d.slug,
            "events": [g[0] for g in groups],
            "starts": [g[1] for g in groups],
            "steps": [g[2] for g in groups],
            "sizes": [g[3] for g in groups],
        },
    )
    rows["capture"] += cursor.rowcount
    cursor.execute(
        _DETECTIONS,
        {"dep": d.id, "seed": seed, "occ_seq": occ_seq, "taxa": taxa, "n_taxa": len(taxa)},
    )
    detections, occurrences = cursor.fetchone()
    rows["detection"] += detections
    rows["occurrence"] += occurrences


def _insert_collection(cursor, plan: Plan, c: CollectionPlan, project_id: int) -> int:
    """One capture set and its images (picked by ``c.where`` among its project's stations);
    returns the memberships written."""
    collection_id = _insert_returning(
        cursor,
        "INSERT INTO monitoring_sourceimagecollection (created_at, updated_at, project_id,"
        " name, source_images_count, source_images_with_detections_count,"
        " source_images_processed_count) VALUES (now(), now(), %(p)s, %(n)s, 0, 0, 0)"
        " RETURNING id",
        {"p": project_id, "n": c.name},
    )[0][0]
    deps = [d.id for d in plan.deployments if d.project == c.project]
    cursor.execute(
        _MEMBERS.format(where=c.where),
        {"collection": collection_id, "deps": deps, "seed": plan.seed, **c.params},
    )
    return cursor.rowcount


def _step(captures: int, span: timedelta = NIGHT) -> timedelta:
    """Whole seconds between captures spreading ``captures`` over ``span``."""
    return timedelta(seconds=span.total_seconds() // max(1, captures))


def _insert_deployment(cursor, d: DeploymentPlan, project_id: int) -> int:
    deployment_id = _insert_returning(
        cursor,
        "INSERT INTO monitoring_deployment (created_at, updated_at, project_id, name,"
        " events_count, occurrences_count, captures_count, detections_count, taxa_count)"
        " VALUES (now(), now(), %(p)s, %(n)s, 0, 0, 0, 0, 0) RETURNING id",
        {"p": project_id, "n": d.name},
    )[0][0]
    found = _insert_returning(
        cursor,
        'INSERT INTO monitoring_event (created_at, updated_at, deployment_id, start, "end",'
        " captures_count, detections_count, occurrences_count)"
        " SELECT now(), now(), %(d)s, s, e, 0, 0, 0"
        " FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[]) AS n(s, e)"
        " RETURNING id, start",
        {
            "d": deployment_id,
            "starts": [n.start for n in d.nights],
            "ends": [n.end for n in d.nights],
        },
    )
    by_start = {start: event_id for event_id, start in found}
    for n in d.nights:
        n.id = by_start[n.start]
    return deployment_id
