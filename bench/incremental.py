"""Section 6: how long counts take to become exact again after a small write (issue #11).

The cached counts are only as good as their freshness: a user who adds ten captures to a set
expects the set's numbers to follow within moments, whatever the set's size. This section
measures exactly that, with the engine's own drain in this process (no queue, no debounce):
one committed write, then ``counts.drain()`` called until it returns an empty batch, timed as
a whole. Every write is made on the seeded dataset itself, around its largest capture set,
because that is where a drain that recounts instead of following the change hurts most.

The cases, with the goals the issue set for the drain:

1. ``collection.images.add()`` of 10 captures not yet in the largest set — ≤ 20 ms;
2. ``Detection.objects.bulk_create`` of 10 detections (bbox set) on 10 of its members — ≤ 20 ms;
3. one ``Detection.objects.create`` on one of its members — ≤ 5 ms;
4. 1,000 ``Detection.objects.create`` calls, each its own transaction, then one drain to
   empty — ≤ 1,000 ms for the drain;
5. the set's project changes ``default_filters_score_threshold`` (+0.05 and back): the
   *writer's* statement and commit — ≤ 10 ms; the drain has no goal but is reported per
   occurrence whose score lies between the two thresholds (the counted/uncounted flips);
5b. one detection joining a counted occurrence on one of its members — ≤ 5 ms; 10 such,
   bulk-created — ≤ 20 ms (the set's ``occurrences_count`` and ``taxa_count``, issue 26);
6. k (10, 100, 1,000) detections bulk-created on random captures: drain time per changed row,
   the figure that should stay flat from 10⁵ to 10⁷ captures (see ``--plot-scaling``).

Each sample: prepare inputs (untimed), ``VACUUM`` the mark table (no sample pays for the dead
marks of the one before), write in its own committed transaction (timed, commit included,
quiet: no message is sent, as in every bench section but the burst), drain to empty (timed),
check the touched counts against independent SQL (untimed), then undo the write — delete the
detections, remove the members, restore the threshold — and drain again (untimed), so the
dataset ends as it began. Detections the bench makes carry ``score = -1``, a value real
detections never have, so those of a run that died half-way are deleted by the next one
(:func:`bench.dataset.remove_bench_detections`); a run killed between adding members and removing
them, or between a threshold change and its restore, leaves that change behind.

Samples rotate through the cases (the first case of one repeat is the second of the next) after
one untimed warm-up round, so drift in the machine's state falls on all cases alike; each figure
is the median over ``--incr-repeats`` repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import CommandError
from django.db import connection, transaction

import counts
from bench import dataset
from bench.timing import median, ms, ms_list, stopwatch
from counts.run.notice import quiet
from project.monitoring.models import Detection, Project, SourceImageCollection

SENTINEL = dataset.BENCH_SCORE
MARKS = "counts_dirtymark"
#: Batches one drain-to-empty may take before the bench gives up (a drain that keeps finding
#: marks, such as one re-marking what it cannot lock, would otherwise spin forever).
MAX_BATCHES = 100_000
BBOX = [10, 10, 120, 140]


def drain_to_empty() -> tuple[int, int]:
    """``counts.drain()`` with the workers' batch size until a batch says no due mark is left
    (``DrainResult.more``), as a worker's drainer knows it.

    Returns (batches that found marks, marks consumed). A batch that finds nothing (the write
    left no mark, or the last batch was exactly full) is not counted but is timed by the
    caller, as a worker pays for it too.
    """
    marks = 0
    for batches in range(MAX_BATCHES):
        result = counts.drain(batch_size=settings.COUNTS_DRAIN_BATCH)
        marks += result.marks
        if not result.more:
            return batches + (not result.empty), marks
    raise CommandError(f"marks still pending after {MAX_BATCHES:,} drain batches")


def largest_set() -> SourceImageCollection:
    """The dataset's capture set with the most images, by its cached count (bench sets are
    gone by the time this section runs, and excluded anyway)."""
    found = (
        SourceImageCollection.objects.exclude(project__name__startswith=dataset.PREFIX)
        .order_by("-source_images_count", "id")
        .first()
    )
    if found is None or not found.source_images_count:
        raise CommandError("the dataset has no capture set with images to measure on")
    return found


def _ids(sql: str, params: list) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def members(set_id: int, n: int, salt: int) -> list[int]:
    """``n`` members of the set, hash-ordered (scattered, the same every run)."""
    return _ids(
        f"SELECT sourceimage_id FROM {dataset.THROUGH} WHERE sourceimagecollection_id = %s"
        " ORDER BY hashint8extended(sourceimage_id, %s), sourceimage_id LIMIT %s",
        [set_id, salt, n],
    )


def non_members(set_id: int, n: int, salt: int) -> list[int]:
    """``n`` captures not in the set, hash-ordered."""
    return _ids(
        "SELECT id FROM monitoring_sourceimage s WHERE NOT EXISTS (SELECT 1 FROM"
        f" {dataset.THROUGH} m WHERE m.sourceimagecollection_id = %s AND m.sourceimage_id = s.id)"
        " ORDER BY hashint8extended(id, %s), id LIMIT %s",
        [set_id, salt, n],
    )


def window(pool: list[int], rep: int, n: int) -> list[int]:
    """The rep-th run of ``n`` distinct ids from ``pool`` (wrapping), so repeats write to
    different captures rather than to the same warm ones."""
    n = min(n, len(pool))
    return [pool[(rep * n + i) % len(pool)] for i in range(n)]


def flips(project_id: int, low: float, high: float) -> int:
    """Occurrences of the project whose score lies in ``[low, high)``: counted under one
    threshold and not under the other."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM monitoring_occurrence o JOIN monitoring_deployment p"
            " ON p.id = o.deployment_id WHERE p.project_id = %s"
            " AND o.determination_score >= %s AND o.determination_score < %s",
            [project_id, low, high],
        )
        return cursor.fetchone()[0]


# --- The cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One kind of write. ``prepare``, ``write`` and ``undo`` take the round number (so each
    round writes to other captures) and commit their own transactions; ``check`` says whether
    the counts the write touched are exact. Only ``write`` is timed, and the drain after it."""

    key: str
    label: str
    goal_ms: float | None
    changed_rows: int
    write: Callable[[int], None]
    undo: Callable[[int], None]
    check: Callable[[int], bool]
    prepare: Callable[[int], None] | None = None
    extra: dict | None = None


def _new_detections(image_ids: list[int]) -> list[Detection]:
    return [Detection(source_image_id=i, bbox=BBOX, score=SENTINEL) for i in image_ids]


def _delete_ours(_round: int) -> None:
    Detection.objects.filter(score=SENTINEL).delete()


def _bulk(key: str, label: str, goal: float | None, pool: list[int], k: int, check) -> Case:
    def write(r: int) -> None:
        with transaction.atomic():
            Detection.objects.bulk_create(_new_detections(window(pool, r, k)))

    return Case(key, label, goal, k, write, _delete_ours, lambda r: check(window(pool, r, k)))


def cases(big: SourceImageCollection, rounds: int, singles: int, ks: list[int]) -> list[Case]:
    """Every case, on captures chosen now (untimed): ``rounds`` disjoint runs where the
    dataset allows, one per round."""
    sid = big.pk
    outside = non_members(sid, 10 * rounds, salt=11)
    inside = members(sid, max(singles, 10 * rounds), salt=12)
    anywhere = dataset.sample_images(max(ks, default=0) * rounds, salt=13)
    size = f"the {big.source_images_count:,}-image set"

    def in_set_exact(images: list[int]) -> bool:
        return dataset.images_exact(images) and dataset.sets_exact([sid])

    def add(r: int) -> None:
        with transaction.atomic():
            big.images.add(*window(outside, r, 10))

    def remove(r: int) -> None:
        with transaction.atomic():
            big.images.remove(*window(outside, r, 10))

    def one(r: int) -> None:
        Detection.objects.create(source_image_id=window(inside, r, 1)[0], bbox=BBOX, score=SENTINEL)

    def single_images(r: int) -> list[int]:
        return [inside[(r * singles + i) % len(inside)] for i in range(singles)]

    def each(r: int) -> None:
        for image in single_images(r):  # autocommit: one transaction per create
            Detection.objects.create(source_image_id=image, bbox=BBOX, score=SENTINEL)

    out = [
        Case(
            "add_members",
            f"images.add() of 10 captures to {size}",
            20,
            10,
            add,
            remove,
            lambda r: dataset.sets_exact([sid]),
        ),
        _bulk(
            "bulk_detections",
            f"bulk_create of 10 detections in {size}",
            20,
            inside,
            10,
            in_set_exact,
        ),
        Case(
            "one_detection",
            f"one Detection create() in {size}",
            5,
            1,
            one,
            _delete_ours,
            lambda r: in_set_exact(window(inside, r, 1)),
        ),
        Case(
            "single_creates",
            f"{singles:,} single create()s in {size}, then drain",
            1000,
            singles,
            each,
            _delete_ours,
            lambda r: in_set_exact(sorted(set(single_images(r)))),
        ),
        threshold_case(big.project_id),
        *occurrence_cases(big, inside, rounds),
    ]
    for k in ks:
        out.append(
            _bulk(
                f"per_row_{k}",
                f"bulk_create of {k:,} detections, random captures",
                None,
                anywhere,
                k,
                dataset.images_exact,
            )
        )
    return out


def occurrence_cases(big: SourceImageCollection, inside: list[int], rounds: int) -> list[Case]:
    """Detections joining a counted occurrence that had none on the set's captures: the set's
    ``occurrences_count`` (and maybe ``taxa_count``) moves, kept through the occurrence's
    links (occurrence → its detections' captures → their sets), never by recounting the set."""
    sid = big.pk
    counted = dataset.counted_occurrences_off(sid, 10 * rounds, salt=14)
    size = f"the {big.source_images_count:,}-image set"

    def joining(r: int, k: int) -> list[Detection]:
        pairs = zip(window(inside, r, k), window(counted, r, k), strict=False)
        return [
            Detection(source_image_id=i, bbox=BBOX, score=SENTINEL, occurrence_id=o)
            for i, o in pairs
        ]

    def one(r: int) -> None:
        joining(r, 1)[0].save()

    def ten(r: int) -> None:
        with transaction.atomic():
            Detection.objects.bulk_create(joining(r, 10))

    def check(_r: int) -> bool:
        return dataset.set_occurrences_exact([sid])

    if not counted:
        return []
    return [
        Case(
            "one_occurrence",
            f"one detection joining an occurrence, in {size}",
            5,
            1,
            one,
            _delete_ours,
            check,
        ),
        Case(
            "ten_occurrences",
            f"10 detections joining occurrences, in {size}",
            20,
            10,
            ten,
            _delete_ours,
            check,
        ),
    ]


def threshold_case(project_id: int) -> Case:
    """The project's threshold up by 0.05 in even rounds, back down in odd ones (set up,
    untimed, by ``prepare``); restored after every round."""
    project = Project.objects.get(pk=project_id)
    low = project.default_filters_score_threshold
    high = round(low + 0.05, 6)
    qs = Project.objects.filter(pk=project_id)

    def set_to(value: float) -> None:
        with transaction.atomic():
            qs.exclude(default_filters_score_threshold=value).update(
                default_filters_score_threshold=value
            )

    flipped = flips(project_id, low, high)
    return Case(
        "threshold",
        f"project {project.pk} threshold {low:g} → {high:g} and back",
        None,
        flipped,
        lambda r: set_to(low if r % 2 else high),
        lambda r: set_to(low),
        lambda r: dataset.threshold_exact(project_id),
        prepare=lambda r: set_to(high) if r % 2 else None,
        extra={
            "project": project_id,
            "project_name": project.name,
            "from": low,
            "to": high,
            "flips": flipped,
            "writer_goal_ms": 10,
        },
    )


# --- Measuring ---------------------------------------------------------------------------------


def sample(case: Case, r: int) -> dict:
    """One write, timed with its commit, and the drain after it; undone whatever happens."""
    try:
        if case.prepare:
            with quiet():
                case.prepare(r)
            dataset.drain_all()
        dataset.vacuum(MARKS)
        # The vacuum's new statistics invalidate the prepared take statement's plan
        # (``counts.base.prepared``): a worker's connection plans it again once per (auto)vacuum of
        # the queue, not once per drain. An untimed drain that finds nothing pays for it here.
        drain_to_empty()
        with quiet(), stopwatch() as written:
            case.write(r)
        with stopwatch() as drained:
            batches, marks = drain_to_empty()
        exact = case.check(r)
    finally:
        with quiet():
            case.undo(r)
        dataset.drain_all()
    return {
        "write": written.seconds,
        "drain": drained.seconds,
        "batches": batches,
        "marks": marks,
        "exact": exact,
    }


def measure(
    big: SourceImageCollection, captures: int, repeats: int, singles: int, ks: list[int], log
) -> dict:
    made = cases(big, repeats + 1, singles, ks)
    dataset.vacuum()
    samples: dict[str, list[dict]] = {c.key: [] for c in made}
    for rep in range(-1, repeats):  # -1: the untimed warm-up round
        shift = rep % len(made)
        for case in made[shift:] + made[:shift]:
            got = sample(case, rep + 1)
            if rep >= 0:
                samples[case.key].append(got)
        log(f"incremental: round {rep + 1}/{repeats}" + (" (warm-up)" if rep < 0 else ""))
    dataset.vacuum()
    out: dict = {
        "repeats": repeats,
        "captures": captures,
        "drain_batch": settings.COUNTS_DRAIN_BATCH,
        "largest_set": {"id": big.pk, "name": big.name, "images": big.source_images_count},
        "cases": {},
    }
    for case in made:
        out["cases"][case.key] = row = summary(case, samples[case.key])
        log(
            f"incremental {case.key}: write {row['write_ms']:.1f} ms, drain"
            f" {row['drain_ms']:.1f} ms ({row['marks']:g} marks, {row['batches']:g} batches)"
            + ("" if row["exact"] else "  (NOT EXACT)")
        )
    out["exact"] = all(c["exact"] for c in out["cases"].values())
    out["per_row"] = [
        {"k": k, **{f: out["cases"][f"per_row_{k}"][f] for f in ("drain_ms", "drain_ms_per_row")}}
        for k in ks
    ]
    return out


def summary(case: Case, got: list[dict]) -> dict:
    drain = median([s["drain"] for s in got])
    rows = max(case.changed_rows, 1)
    return {
        "label": case.label,
        "goal_ms": case.goal_ms,
        "changed_rows": case.changed_rows,
        "write_ms": ms(median([s["write"] for s in got])),
        "drain_ms": ms(drain),
        "drain_ms_per_row": round(drain * 1000 / rows, 4),
        "marks": median([s["marks"] for s in got]),
        "batches": median([s["batches"] for s in got]),
        "exact": all(s["exact"] for s in got),
        "met": None if case.goal_ms is None else ms(drain) <= case.goal_ms,
        **(case.extra or {}),
        "samples_ms": {
            "write": ms_list([s["write"] for s in got]),
            "drain": ms_list([s["drain"] for s in got]),
        },
    }
