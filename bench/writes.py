"""Section 2: what tracking costs a writer — the same writes with the count triggers on and off.

"Off" is ``ALTER TABLE … DISABLE TRIGGER counts_…`` for the count triggers of the table written,
by name, and nothing else: foreign-key checks and every other trigger still run, as they would
for a writer in a world without cached counts. (``session_replication_role = replica`` would
skip the foreign-key triggers too and flatter the "off" side.)

Each sample is one transaction that is rolled back: toggle the triggers, prepare the inputs
(untimed), run the write (timed), count the marks it left, roll back. The rollback restores
the triggers and removes the rows, and no other session ever sees the triggers disabled (the
ALTER holds the table's lock until the rollback); a ``VACUUM`` of the written tables after each
sample (untimed) clears the dead rows the rollback leaves, so every sample starts from the same
clean table. The "on" side runs ``ENABLE TRIGGER`` on the same names so both sides take
the same lock and the same plan invalidation. Commit is left out of both sides; it is the same
fsync either way, so leaving it out makes the on/off ratio larger, not smaller.

Repeats alternate on/off and off/on (ABBA), after one untimed pair, so a slow drift of the
machine's state cancels out of the median ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection, transaction

from bench import dataset
from bench.timing import median, ms, ms_list, ratio, stopwatch
from counts.base.names import MARK_TABLE, q
from project.monitoring.models import Detection, SourceImageCollection


@dataclass
class WriteCase:
    """One kind of write: its tables, an untimed ``prepare`` and the timed ``run``."""

    key: str
    label: str
    tables: tuple[str, ...]
    prepare: Callable[[], object]
    run: Callable[[object], None]


def count_triggers(table: str) -> list[str]:
    """Names of the count triggers on ``table`` (``counts_ins_…``, ``counts_upd_…``, …)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
            r" AND tgname LIKE 'counts\_%%' ORDER BY tgname",
            [table],
        )
        return [row[0] for row in cursor.fetchall()]


def _sample(case: WriteCase, on: bool) -> tuple[float, int]:
    """One rolled-back run; returns (seconds, marks written)."""
    with transaction.atomic(), connection.cursor() as cursor:
        for table in case.tables:
            for name in count_triggers(table):
                action = "ENABLE" if on else "DISABLE"
                cursor.execute(f"ALTER TABLE {q(table)} {action} TRIGGER {q(name)}")
        cursor.execute(f"SELECT coalesce(max(id), 0) FROM {MARK_TABLE}")
        last_mark = cursor.fetchone()[0]
        inputs = case.prepare()
        with stopwatch() as sw:
            case.run(inputs)
        cursor.execute(f"SELECT count(*) FROM {MARK_TABLE} WHERE id > %s", [last_mark])
        marks = cursor.fetchone()[0]
        transaction.set_rollback(True)
    dataset.vacuum(*case.tables, MARK_TABLE)
    return sw.seconds, marks


def measure_case(case: WriteCase, repeats: int) -> dict:
    _sample(case, True)
    _sample(case, False)
    samples: dict[bool, list[float]] = {True: [], False: []}
    marks: dict[bool, int] = {}
    for rep in range(repeats):
        for on in (True, False) if rep % 2 == 0 else (False, True):
            seconds, marks[on] = _sample(case, on)
            samples[on].append(seconds)
    on_s, off_s = median(samples[True]), median(samples[False])
    return {
        "label": case.label,
        "on_ms": ms(on_s),
        "off_ms": ms(off_s),
        "ratio": round(ratio(on_s, off_s), 3),
        "marks_on": marks[True],
        "marks_off": marks[False],
        "samples_ms": {"on": ms_list(samples[True]), "off": ms_list(samples[False])},
    }


def cases(big_set: int, bulk: int, saves: int, m2m: int) -> list[WriteCase]:
    """The three writes, all on captures of the largest capture set the bench made.

    Detections go to images that belong to a big set (and to the seeded sets), so the trigger
    walks every route it has: image, night, station and capture sets.
    """
    images, detections = _in_big_set(big_set, max(1, bulk // 2), saves)
    members = dataset.sample_images(m2m, salt=2)
    project = SourceImageCollection.objects.get(pk=big_set).project_id

    def new_detections():
        return [
            Detection(source_image_id=images[i % len(images)], bbox=[i % 97, 10, 120, 140])
            for i in range(bulk)
        ]

    def loaded_and_edited():
        edited = list(Detection.objects.filter(pk__in=detections))
        for d in edited:
            d.bbox = None if d.bbox else [5, 5, 60, 60]  # flips "valid" both ways
        return edited

    def save_each(edited):
        for d in edited:
            d.save()

    def empty_set():
        return SourceImageCollection.objects.create(project_id=project, name="bench m2m add")

    return [
        WriteCase(
            "bulk_create",
            f"bulk_create {bulk:,} detections",
            ("monitoring_detection",),
            new_detections,
            lambda objs: Detection.objects.bulk_create(objs),
        ),
        WriteCase(
            "single_saves",
            f"{len(detections):,} single-row Detection.save()",
            ("monitoring_detection",),
            loaded_and_edited,
            save_each,
        ),
        WriteCase(
            "m2m_add",
            f"M2M add of {len(members):,} images",
            (dataset.THROUGH,),
            empty_set,
            lambda s: s.images.add(*members),
        ),
    ]


def _in_big_set(big_set: int, images: int, detections: int) -> tuple[list[int], list[int]]:
    """The first ``images`` captures of the set and the first ``detections`` detections on its
    captures, by id."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT sourceimage_id FROM {dataset.THROUGH} WHERE sourceimagecollection_id = %s"
            " ORDER BY sourceimage_id LIMIT %s",
            [big_set, images],
        )
        image_ids = [row[0] for row in cursor.fetchall()]
        cursor.execute(
            f"SELECT d.id FROM monitoring_detection d JOIN {dataset.THROUGH} m"
            " ON m.sourceimage_id = d.source_image_id AND m.sourceimagecollection_id = %s"
            " ORDER BY d.id LIMIT %s",
            [big_set, detections],
        )
        return image_ids, [row[0] for row in cursor.fetchall()]


def measure(big_set: int, repeats: int, bulk: int, saves: int, m2m: int, log) -> dict:
    out = {"repeats": repeats}
    for case in cases(big_set, bulk, saves, m2m):
        out[case.key] = result = measure_case(case, repeats)
        log(
            f"write {case.label}: on {result['on_ms']:.1f} ms, off {result['off_ms']:.1f} ms,"
            f" x{result['ratio']:.3f} ({result['marks_on']} marks on, {result['marks_off']} off)"
        )
    return out
