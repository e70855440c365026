"""Section 3: recomputing 1,000 dirty capture sets, grouped against one set at a time.

The sets are small and overlapping (20-200 members each, drawn from one pool of captures), the
shape of a day in which many sets were touched once: the work per set is small, so what the
figure shows is the per-statement and per-transaction overhead that grouping removes.

Each repeat makes every set stale (its three columns zeroed) and then recomputes all of them
three ways, rotating which goes first:

- **grouped drain** — 1,000 one-id marks, as 1,000 single-row writes would leave them, drained
  by ``counts.drain()`` with the workers' batch size: take marks, lock, one aggregate statement
  per batch, one ``UPDATE … FROM`` of the rows that changed;
- **per-set statement** — the engine's own compiled statement with one id, in one transaction
  per set (:func:`counts.operate.recomputing.recompute_rows`): the same SQL, ungrouped;
- **per-set ORM aggregate** — the pull request's ``update_calculated_fields``: one
  ``aggregate()`` of the set's images and one ``UPDATE`` per set.

All three must leave every set exact, checked against independent SQL after each.

Before those sets exist, :func:`new_set` times **"Recompute now" of a capture set made after the
statistics were last taken** (200 captures beside the dataset's large sets): the planner sizes a
set it has no statistics for by the average of the others, and the recount planned for that size
reads every detection and occurrence. Two ways, alternated: the engine's (a batch whose stored
counts add up to few rows is recounted by index probes, ``counts.run.aggregate``) and the
planner's own plan (``aggregate.PROBES_BELOW = 0``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q

from bench import dataset
from bench.timing import median, ms, ms_list, ratio, stopwatch
from counts.base.names import ENGINE_SETTING, MARK_TABLE
from counts.operate.recomputing import recompute_rows
from counts.run import aggregate
from counts.run.draining import drain
from counts.run.notice import quiet
from project.monitoring.models import SourceImage, SourceImageCollection

METHODS = ("grouped", "per_set_statement", "per_set_orm")
#: Captures in the set of :func:`new_set`.
NEW_SET_SIZE = 200


def setup(n_sets: int) -> list[int]:
    """``n_sets`` sets of 20-200 members each, counts exact; returns their ids."""
    sizes = [20 + (i * 37) % 181 for i in range(n_sets)]
    pool = dataset.sample_images(min(sum(sizes), 50_000), salt=3)
    project = dataset.new_project("recompute")
    ids = dataset.new_sets(project, [f"small set {i:04d}" for i in range(n_sets)])
    set_ids, image_ids, start = [], [], 0
    for set_id, size in zip(ids, sizes, strict=True):
        size = min(size, len(pool))
        set_ids += [set_id] * size
        image_ids += [pool[(start + j) % len(pool)] for j in range(size)]
        start += 97
    dataset.add_members(set_ids, image_ids)
    dataset.drain_all()
    dataset.vacuum()
    return ids


def _make_stale(ids: list[int]) -> None:
    """Zero the sets' counts with triggers off (the guards let only the engine write them)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(
            "UPDATE monitoring_sourceimagecollection SET source_images_count = 0,"
            " source_images_with_detections_count = 0, source_images_processed_count = 0"
            " WHERE id = ANY(%s)",
            [ids],
        )
        cursor.execute("SET LOCAL session_replication_role = DEFAULT")


def grouped(ids: list[int]) -> None:
    """Drain as a worker does: batches of ``COUNTS_DRAIN_BATCH`` marks until none is left."""
    while not drain(batch_size=settings.COUNTS_DRAIN_BATCH, targets=[dataset.COLLECTION]).empty:
        pass


def _mark_each(ids: list[int]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {MARK_TABLE} (target, ids)"
            " SELECT %s, ARRAY[x] FROM unnest(%s::bigint[]) x",
            [dataset.COLLECTION, ids],
        )


def per_set_statement(ids: list[int]) -> None:
    for pk in ids:
        recompute_rows({dataset.COLLECTION: [pk]})


def per_set_orm(ids: list[int]) -> None:
    """The pull request's ``get_source_image_counts()`` + ``update_calculated_fields()``.

    Each set in its own transaction, allowed to write cached columns as the engine is.
    """
    with quiet():
        for pk in ids:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT set_config(%s, 'on', true)", [ENGINE_SETTING])
                values = SourceImage.objects.filter(collections=pk).aggregate(
                    source_images_count=Count("id", distinct=True),
                    source_images_with_detections_count=Count(
                        "id", distinct=True, filter=Q(detections__bbox__isnull=False)
                    ),
                    source_images_processed_count=Count(
                        "id", distinct=True, filter=Q(detections__isnull=False)
                    ),
                )
                SourceImageCollection.objects.filter(pk=pk).update(**values)


_RUN = {"grouped": grouped, "per_set_statement": per_set_statement, "per_set_orm": per_set_orm}


def measure(ids: list[int], repeats: int, log) -> dict:
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    exact = True
    for rep in range(repeats):
        shift = rep % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            _make_stale(ids)
            if method == "grouped":
                _mark_each(ids)
            dataset.vacuum("monitoring_sourceimagecollection", MARK_TABLE)
            with stopwatch() as sw:
                _RUN[method](ids)
            samples[method].append(sw.seconds)
            exact = exact and dataset.sets_exact(ids)
    medians = {m: median(s) for m, s in samples.items()}
    out = {
        "sets": len(ids),
        "repeats": repeats,
        "drain_batch": settings.COUNTS_DRAIN_BATCH,
        **{f"{m}_ms": ms(medians[m]) for m in METHODS},
        "statement_ratio": round(ratio(medians["per_set_statement"], medians["grouped"]), 2),
        "orm_ratio": round(ratio(medians["per_set_orm"], medians["grouped"]), 2),
        "exact": exact,
        "samples_ms": {m: ms_list(s) for m, s in samples.items()},
    }
    log(
        f"recompute {len(ids):,} sets: grouped {out['grouped_ms']:.0f} ms, per-set statement"
        f" {out['per_set_statement_ms']:.0f} ms, per-set ORM {out['per_set_orm_ms']:.0f} ms"
        + ("" if exact else "  (NOT EXACT)")
    )
    return out


def new_set(repeats: int, log) -> dict:
    """ "Recompute now" of one new set (see the module docstring): the engine's plan against
    the planner's, each stale (counts zeroed) before it is recomputed, exact after."""
    dataset.vacuum(dataset.THROUGH)  # statistics of the dataset's sets, not of the new one
    (set_id,) = dataset.new_sets(dataset.new_project("recompute-new"), ["new set"])
    dataset.add_members([set_id] * NEW_SET_SIZE, dataset.sample_images(NEW_SET_SIZE, salt=11))
    dataset.drain_all()
    variants = {"engine": aggregate.PROBES_BELOW, "planner": 0}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    exact = True
    try:
        for rep in range(repeats):
            for variant in sorted(variants, reverse=rep % 2 == 1):
                aggregate.PROBES_BELOW = variants[variant]
                _make_stale([set_id])
                with stopwatch() as sw:
                    recompute_rows({dataset.COLLECTION: [set_id]})
                samples[variant].append(sw.seconds)
                exact = exact and dataset.sets_exact([set_id])
    finally:
        aggregate.PROBES_BELOW = variants["engine"]
    out = {
        "captures": NEW_SET_SIZE,
        "repeats": repeats,
        **{f"{v}_ms": ms(median(samples[v])) for v in variants},
        "ratio": round(ratio(median(samples["planner"]), median(samples["engine"])), 2),
        "exact": exact,
        "samples_ms": {v: ms_list(s) for v, s in samples.items()},
    }
    log(
        f"recompute now, new set of {NEW_SET_SIZE} captures: engine {out['engine_ms']:.1f} ms,"
        f" planner's plan {out['planner_ms']:.1f} ms" + ("" if exact else "  (NOT EXACT)")
    )
    return out
