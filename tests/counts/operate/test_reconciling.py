"""Reconcile finds drift the triggers could not see, reports it per field, and repairs it.

Drift is planted the two ways it happens in production: base rows written with triggers off
(``session_replication_role = replica``, as a restore or a logical replica does), and a cached
column overwritten by hand. ``dry_run`` must report without writing; the default repairs.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

import counts
from counts.base.errors import UnknownTargetError
from project.monitoring.models import Detection, SourceImage
from tests.truth import assert_all_counts_exact, cached, drain_all, mismatches, triggers_off

D, E, S, C = (
    "monitoring.deployment",
    "monitoring.event",
    "monitoring.sourceimage",
    "monitoring.sourceimagecollection",
)
TABLES = (
    "monitoring_deployment",
    "monitoring_event",
    "monitoring_sourceimage",
    "monitoring_sourceimagecollection",
)


def snapshot() -> dict:
    """Every cached value and freshness stamp, to prove a dry run wrote nothing."""
    with connection.cursor() as cursor:
        stamps = {}
        for table in TABLES:
            cursor.execute(f"SELECT id, counts_updated_at FROM {table}")
            stamps[table] = dict(cursor.fetchall())
    return {"cached": {t: cached(t) for t in TABLES}, "stamps": stamps}


def write_behind_the_triggers(world) -> None:
    """Base-table writes made with triggers (and FK checks) switched off for the session."""
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
        try:
            cursor.execute(
                "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
                " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
                [world.i3.pk],
            )
            cursor.execute(
                "DELETE FROM monitoring_sourceimagecollection_images"
                " WHERE sourceimagecollection_id = %s AND sourceimage_id = %s",
                [world.c2.pk, world.i4.pk],
            )
            cursor.execute(
                "UPDATE monitoring_occurrence SET determination_score = 0.9 WHERE id = %s",
                [world.o2.pk],
            )
        finally:
            cursor.execute("SET session_replication_role = DEFAULT")


def drift_from_truth() -> tuple[dict[str, dict[str, int]], int]:
    """What reconcile must find, read off the independent truth: per model, drifted rows per
    field, and the number of drifted rows. Derived rather than listed, so that a count added
    to the domain (and drifting with the others) changes the expectation, not the test."""
    fields: dict[str, Counter] = {}
    rows = set()
    for line in mismatches():
        where, rest = line.split(" ", 1)
        label, pk = where.split("#")
        fields.setdefault(label, Counter())[rest.split(":")[0]] += 1
        rows.add((label, pk))
    return {label: dict(c) for label, c in fields.items()}, len(rows)


@pytest.fixture
def drifted(world, marks):
    write_behind_the_triggers(world)
    assert marks.rows() == []  # the triggers saw nothing
    assert mismatches()  # so the cached counts are now wrong
    return world


def test_dry_run_reports_drift_per_field_without_writing(drifted):
    before = snapshot()
    expected, drifted_rows = drift_from_truth()
    report = counts.reconcile(dry_run=True)
    assert report.dry_run
    drift = {label: dict(m.drift) for label, m in report.models.items() if m.drift}
    assert drift == expected
    # What the planted writes change, in the domain's own counts:
    assert expected[S] == {"detections_count": 1}
    assert expected[C]["source_images_count"] == 1
    assert expected[D]["occurrences_count"] == 1 and expected[E]["occurrences_count"] == 1
    assert report.drifted_rows == drifted_rows
    assert report.checked == 3 + 3 + 5 + 3 + sum(
        m.checked for label, m in report.models.items() if label not in (D, E, S, C)
    )
    assert snapshot() == before


def test_reconcile_repairs_by_default_and_then_finds_nothing(drifted):
    _expected, drifted_rows = drift_from_truth()
    report = counts.reconcile()
    assert not report.dry_run and report.drifted_rows == drifted_rows
    assert_all_counts_exact()
    again = counts.reconcile()
    assert again.drifted_rows == 0 and again.checked == report.checked


def test_ledger_drift_is_found_and_repaired_before_the_targets(world, marks):
    """A detection written with the triggers off: the capture's ledger no longer matches it.
    Reconcile repairs the ledger first, so the next ordinary change to that capture credits
    only itself, and the counts stay exact after it."""
    with triggers_off() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
            [world.i3.pk],
        )
    dry = counts.reconcile(dry_run=True)
    assert dry.ledgers["item:monitoring.sourceimage"].drifted_rows == 1
    report = counts.reconcile()
    assert report.ledgers["item:monitoring.sourceimage"].drifted_rows == 1
    assert_all_counts_exact()
    Detection.objects.create(source_image=world.i3, bbox=[5, 6, 7, 8])
    drain_all()
    assert_all_counts_exact()
    assert counts.reconcile(dry_run=True).ledgers["item:monitoring.sourceimage"].drifted_rows == 0


def test_a_hand_corrupted_cached_column_is_repaired(world, marks):
    with triggers_off() as cursor:
        cursor.execute(
            "UPDATE monitoring_sourceimagecollection SET source_images_count = 0 WHERE id = %s",
            [world.c1.pk],
        )
    report = counts.reconcile(model="monitoring.sourceimagecollection")
    assert list(report.models) == [C]
    assert dict(report.models[C].drift) == {"source_images_count": 1}
    example = report.models[C].examples[0]
    assert (example.pk, example.old["source_images_count"], example.new["source_images_count"]) == (
        world.c1.pk,
        0,
        3,
    )
    assert_all_counts_exact()


def test_reconcile_can_be_limited_to_one_model(drifted):
    report = counts.reconcile(model=SourceImage)
    assert list(report.models) == [S]
    assert mismatches() and not [m for m in mismatches() if m.startswith(f"{S}#")]
    with pytest.raises(UnknownTargetError):
        counts.reconcile(model="counts_testapp.author")  # a model without counts


def test_reconcile_walks_rows_in_chunks(drifted):
    seen = []
    report = counts.reconcile(chunk=2, progress=lambda label, n: seen.append((label, n)))
    assert [n for label, n in seen if label == S] == [2, 4, 5]
    assert report.models[S].checked == 5
    assert_all_counts_exact()


def test_reconcile_does_not_touch_rows_without_drift(drifted):
    untouched = Detection.objects.get(pk=drifted.det5.pk).source_image_id  # i5: no drift
    stamp = SourceImage.objects.get(pk=untouched).counts_updated_at
    counts.reconcile()
    assert SourceImage.objects.get(pk=untouched).counts_updated_at == stamp


def test_command_reconcile_dry_run_json(drifted):
    before = snapshot()
    out = StringIO()
    call_command("counts", "reconcile", "--dry-run", "--json", stdout=out, stderr=StringIO())
    report = json.loads(out.getvalue())
    assert report["dry_run"] is True and report["drifted_rows"] == drift_from_truth()[1]
    assert report["models"][C]["drift"]["source_images_count"] == 1
    assert snapshot() == before


def test_command_reconcile_repairs_and_says_so(drifted):
    out = StringIO()
    call_command("counts", "reconcile", stdout=out, stderr=StringIO())
    assert "monitoring.sourceimage: 5 checked, 1 repaired (detections_count=1)" in out.getvalue()
    assert_all_counts_exact()


def test_command_rebuild_of_one_model(drifted):
    out = StringIO()
    call_command("counts", "rebuild", "--model", "monitoring.event", stdout=out, stderr=StringIO())
    assert "Rebuilt 3 rows (2 changed)" in out.getvalue()
    assert not [line for line in mismatches() if line.startswith("monitoring.event#")]


def test_command_rejects_an_unknown_model(world):
    with pytest.raises(CommandError, match=r"counts_testapp\.author"):
        call_command("counts", "reconcile", "--model", "counts_testapp.author", stdout=StringIO())


def test_command_status_shows_pending_marks_and_trigger_health(world, marks, live_processes):
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    out = StringIO()
    call_command("counts", "status", "--json", stdout=out)
    report = json.loads(out.getvalue())
    pending = {row["label"]: row for row in report["pending"]}
    # One item mark: the capture is recomputed, its own count included.
    assert set(pending) == {"item:monitoring.sourceimage"}
    assert pending["item:monitoring.sourceimage"]["marks"] == 1
    assert pending["item:monitoring.sourceimage"]["ids"] == 1
    modes = {row["count"]: row for row in report["modes"]}
    assert modes[f"{S}.detections_count"] == {
        "count": f"{S}.detections_count",
        "mode": "item",
        "items": S,
    }
    assert modes[f"{D}.captures_count"]["mode"] == "own-row"
    assert modes[f"{C}.source_images_with_detections_count"]["items"] == S
    # Distinct taxa among occurrences over a threshold reached by F(): occurrences are items.
    assert modes[f"{D}.taxa_count"] == {
        "count": f"{D}.taxa_count",
        "mode": "item",
        "items": "monitoring.occurrence",
    }
    assert {row["state"] for row in report["triggers"]} == {"INSTALLED"}
    text = StringIO()
    call_command("counts", "status", stdout=text)
    assert "INSTALLED" in text.getvalue() and "monitoring.sourceimage" in text.getvalue()
    assert re.search(
        r"monitoring\.deployment\.taxa_count +item \(monitoring\.occurrence\)", text.getvalue()
    )


def test_command_status_names_the_index_a_threshold_change_walks_or_its_absence(
    world, live_processes
):
    out = StringIO()
    call_command("counts", "status", "--json", stdout=out)
    rows = json.loads(out.getvalue())["job_indexes"]
    walks = [row for row in rows if row["table"].startswith("monitoring_")]
    assert [(r["table"], r["columns"], r["state"]) for r in walks] == [
        ("monitoring_occurrence", ["deployment_id", "determination_score"], "INDEXED")
    ]
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX {walks[0]['index']}")  # rolled back with the test
    text = StringIO()
    call_command("counts", "status", stdout=text)
    assert re.search(
        r"MISSING +monitoring_occurrence \(deployment_id, determination_score\)", text.getvalue()
    )


def test_command_drain_until_empty(world, marks):
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    out = StringIO()
    call_command("counts", "drain", "--until-empty", stdout=out)
    assert "Drained 1 marks" in out.getvalue()
    assert marks.rows() == []
    assert_all_counts_exact()


def test_public_reconcile_stays_callable_once_its_module_is_imported(world):
    """The scheduler calls ``counts.reconcile()`` every few hours in one long-lived process."""
    importlib.import_module("counts.operate.reconciling")
    assert callable(counts.reconcile)
    report = counts.reconcile(dry_run=True)
    assert report.drifted_rows == 0
    assert sum(report.models[label].checked for label in (D, E, S, C)) == 14
