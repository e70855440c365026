"""``manage.py bench`` at a tiny scale: every section runs, and its JSON says something sane.

The figures themselves are machine-dependent and not asserted; what is asserted is what makes
them worth reading: each comparison actually ran both sides (positive times and ratios), the
triggers really were off on the "off" side (no mark written), every recompute path and the
burst's worker reached exact counts, the three list approaches agreed with an independent count,
every incremental drain left the counts it touched exact, and the bench left the database as it
found it (no bench objects, no extra detections or members, thresholds restored, no marks
pending). Real
PostgreSQL, real Redis, a real in-process worker; committed data, hence ``transaction=True``.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from bench import dataset, incremental
from bench.dataset import PREFIX
from counts.models import DirtyMark
from project.monitoring.models import Detection, Project, SourceImage, SourceImageCollection

pytestmark = [pytest.mark.django_db(transaction=True)]

SECTIONS = ("meta", "list", "write", "recompute", "burst", "incremental", "exact", "reconcile")
INCREMENTAL = ("add_members", "bulk_detections", "one_detection", "single_creates", "threshold")


def positive(*values) -> bool:
    return all(isinstance(v, int | float) and v > 0 for v in values)


def test_bench_runs_every_section_at_a_tiny_scale_and_leaves_the_database_as_found(tmp_path):
    figures, plot = tmp_path / "bench.json", tmp_path / "list.png"
    out, err = StringIO(), StringIO()
    call_command(
        "bench",
        scale=2000,
        repeats=1,
        fullpath_repeats=1,
        sizes="100,1000,5000",
        bulk=200,
        saves=20,
        m2m=500,
        recompute_sets=20,
        burst_writes=200,
        burst_sets=5,
        burst_repeats=1,
        incr_repeats=2,
        incr_singles=30,
        incr_rows="5,20",
        exact_repeats=1,
        json_path=str(figures),
        plot=str(plot),
        stdout=out,
        stderr=err,
    )
    data = json.loads(figures.read_text())
    assert set(SECTIONS) <= set(data), f"missing sections: {set(SECTIONS) - set(data)}"

    meta = data["meta"]
    assert meta["cores"] >= 1 and meta["seeded"] and meta["dataset"]["captures"] == 2000

    listing = data["list"]
    assert [row["size"] for row in listing["sizes"]] == [100, 1000]
    assert "dropping capture-set sizes 5,000: larger than the dataset's 2,000 captures" in (
        err.getvalue()
    )
    assert listing["agree"], "the three list approaches disagree with the truth"
    for row in listing["sizes"]:
        assert row["rows_on_page"] == 25
        assert positive(row["cached_ms"], row["subquery_ms"], row["count_distinct_ms"])
        assert positive(row["subquery_ratio"], row["count_distinct_ratio"])

    for case in ("bulk_create", "single_saves", "m2m_add"):
        write = data["write"][case]
        assert positive(write["on_ms"], write["off_ms"], write["ratio"]), case
        assert write["marks_on"] > 0 and write["marks_off"] == 0, f"{case}: triggers not toggled"

    recompute = data["recompute"]
    assert recompute["exact"] and recompute["sets"] == 20
    assert positive(recompute["statement_ratio"], recompute["orm_ratio"], recompute["grouped_ms"])
    new_set = recompute["new_set"]
    assert new_set["exact"] and positive(new_set["engine_ms"], new_set["planner_ms"])

    burst = data["burst"]
    assert burst["exact"], "the worker never brought the burst's sets to exact counts"
    assert burst["messages_max"] >= 1 and positive(burst["exact_after_p50_s"] + 1e-9)
    assert burst["exact_after_p99_s"] >= burst["exact_after_p50_s"]

    inc = data["incremental"]
    assert inc["exact"], "an incremental drain left the counts it touched wrong"
    assert inc["captures"] == 2000 and inc["repeats"] == 2
    biggest = SourceImageCollection.objects.order_by("-source_images_count").first()
    assert inc["largest_set"]["id"] == biggest.pk
    for key in (*INCREMENTAL, "per_row_5", "per_row_20"):
        case = inc["cases"][key]
        assert len(case["samples_ms"]["drain"]) == 2, key
        assert positive(case["write_ms"], case["drain_ms"], case["marks"]), key
    assert inc["cases"]["single_creates"]["changed_rows"] == 30
    threshold = inc["cases"]["threshold"]
    low, high = threshold["from"], threshold["to"]
    assert high == pytest.approx(low + 0.05)
    assert threshold["flips"] == incremental.flips(threshold["project"], low, high) > 0
    assert [r["k"] for r in inc["per_row"]] == [5, 20]
    assert all(positive(r["drain_ms_per_row"]) for r in inc["per_row"])

    for state in ("idle", "pending"):
        read = data["exact"][state]
        assert read["exact"] and read["rows_on_page"] == 25, state
        assert positive(read["stored_ms"], read["exact_ms"], read["ratio"]), state
    assert data["exact"]["idle"]["item_marks"] == 0
    assert data["exact"]["pending"]["item_marks"] >= 1000

    reconcile = data["reconcile"]
    assert reconcile["drifted_rows"] == 0
    assert positive(reconcile["checked"], reconcile["per_second"])
    # The passes on two connections check the same rows and ledgers and agree: no drift.
    for mode in ("repair", "dry"):
        one, two = (
            reconcile["variants"][f"engine_{mode}"],
            reconcile["variants"][f"parallel_{mode}"],
        )
        assert two["checked"] == one["checked"] and two["drifted_rows"] == 0, mode
        assert two["ledgers"] == one["ledgers"], mode
        assert positive(reconcile["ratios"][f"{mode}_parallel"]), mode
    assert reconcile["agree"] and reconcile["jobs"] == 2

    table = out.getvalue()
    for section in ("list 100", "list 1k", "write", "recompute", "burst", "reconcile"):
        assert section in table
    assert "counts.reconcile(dry_run=True, jobs=2)" in table
    incremental_lines = [line for line in table.splitlines() if line.startswith("incremental")]
    # four small writes, a threshold's writer and drain, two k's, two joining detections
    assert len(incremental_lines) == 4 + 2 + 2 + 2, incremental_lines
    assert any("≤ 5 ms" in line and "one Detection create()" in line for line in table.splitlines())
    assert "cores" in table.splitlines()[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert not Project.objects.filter(name__startswith=PREFIX).exists()
    assert SourceImageCollection.objects.count() == meta["dataset"]["capture_sets"]
    assert not DirtyMark.objects.exists(), "the bench left marks pending"
    assert Detection.objects.count() == meta["dataset"]["detections"]
    assert biggest.images.count() == inc["largest_set"]["images"]
    assert Project.objects.get(pk=threshold["project"]).default_filters_score_threshold == low

    # Runs at other scales are compared from their JSON files, without measuring anything.
    bigger = json.loads(figures.read_text())
    bigger["incremental"]["captures"] = 20_000
    other, scaling = tmp_path / "bigger.json", tmp_path / "scaling.png"
    other.write_text(json.dumps(bigger))
    out = StringIO()
    call_command(
        "bench",
        plot_scaling=[str(figures), str(other)],
        scaling_plot=str(scaling),
        stdout=out,
        stderr=StringIO(),
    )
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["captures", "k=5", "k=20"]
    assert [line.split()[0] for line in lines[2:]] == ["2,000", "20,000"]
    assert scaling.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _corrupt(sql: str, params: list) -> None:
    """A write the count triggers never see (as a restore or a replica would make)."""
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
        try:
            cursor.execute(sql, params)
        finally:
            cursor.execute("SET session_replication_role = DEFAULT")


def test_incremental_checks_see_counts_a_drain_left_wrong():
    """The section's exactness checks are what make its timings worth reading: a drain that
    returned quickly without fixing the counts must show as NOT EXACT."""
    call_command("seed_demo", scale=500, stdout=StringIO(), stderr=StringIO())
    image = SourceImage.objects.filter(detections_count__gt=0).order_by("id").first()
    project = image.deployment.project
    assert dataset.images_exact([image.pk]) and dataset.threshold_exact(project.pk)

    _corrupt("UPDATE monitoring_sourceimage SET detections_count = 99 WHERE id = %s", [image.pk])
    assert not dataset.images_exact([image.pk])
    other = SourceImage.objects.exclude(pk=image.pk).order_by("id").first()
    assert dataset.images_exact([other.pk]), "only the corrupted capture is wrong"

    low = project.default_filters_score_threshold
    assert incremental.flips(project.pk, low, low + 0.2) > 0
    set_threshold = (
        "UPDATE monitoring_project SET default_filters_score_threshold = %s WHERE id = %s"
    )
    _corrupt(set_threshold, [low + 0.2, project.pk])
    assert not dataset.threshold_exact(project.pk)
    _corrupt(set_threshold, [low, project.pk])
    assert dataset.threshold_exact(project.pk)


def test_an_interrupted_sample_still_undoes_its_write_and_drains():
    """The section writes into the dataset itself: a sample that fails half-way (here, its
    check) must still leave no detection, member or mark behind."""
    call_command("seed_demo", scale=500, stdout=StringIO(), stderr=StringIO())
    detections = Detection.objects.count()
    big = incremental.largest_set()
    pool = incremental.non_members(big.pk, 10, salt=1)

    def broken_check(images):
        raise RuntimeError("check failed")

    case = incremental._bulk("bulk", "bulk", 20, pool, 5, broken_check)
    with pytest.raises(RuntimeError, match="check failed"):
        incremental.sample(case, 0)
    assert Detection.objects.count() == detections
    assert not DirtyMark.objects.exists()

    Detection.objects.bulk_create(
        Detection(source_image_id=i, score=incremental.SENTINEL) for i in pool[:3]
    )
    assert dataset.remove_bench_detections() == 3
    assert Detection.objects.count() == detections and not DirtyMark.objects.exists()


def test_report_labels_say_what_the_flatness_and_tail_figures_compute():
    from bench.report import rows

    size = {"agree": True, "subquery_ratio": 50.0, "count_distinct_ratio": 60.0}
    size.update(subquery_ms=9.0, count_distinct_ms=9.0)
    results = {
        "list": {
            "sizes": [
                {**size, "size": 1000, "cached_ms": 4.0},
                {**size, "size": 10_000, "cached_ms": 6.0},
                {**size, "size": 500_000, "cached_ms": 5.0},
            ],
            "cached_flatness": 1.5,
            "agree": True,
        },
        "burst": {
            "writes": 10_000, "sets": 50, "messages_median": 1, "messages_max": 2,
            "exact_after_p50_s": 0.25, "exact_after_p99_s": 0.4, "repeats": 3,
            "debounce_ms": 1000, "exact": True,
        },
    }  # fmt: skip
    by_figure = {row[1]: row for row in rows(results)}
    (flat,) = [row for figure, row in by_figure.items() if "slowest (A)" in figure]
    assert "fastest (B) of 3 set sizes" in flat[1]
    assert flat[2:5] == ("6.0 ms", "4.0 ms", "1.50x"), "A is the slowest size, B the fastest"
    (tail,) = [row for figure, row in by_figure.items() if "p99 (B) of 3 bursts" in figure]
    assert "median (A)" in tail[1] and "≈ the worst seen" in tail[1]
    assert tail[2:4] == ("0.25 s", "0.40 s")


def test_incremental_rows_judge_the_drain_against_its_goal_and_flag_inexact_counts():
    from bench.report import rows

    def case(label, drain_ms, goal_ms, exact=True, **extra):
        met = None if goal_ms is None else drain_ms <= goal_ms
        return {"label": label, "drain_ms": drain_ms, "write_ms": 2.0, "goal_ms": goal_ms,
                "met": met, "exact": exact, "drain_ms_per_row": drain_ms / 10, **extra}  # fmt: skip

    results = {
        "incremental": {
            "repeats": 3,
            "cases": {
                "add_members": case("add", 12.0, 20),
                "bulk_detections": case("bulk", 250.0, 20),
                "one_detection": case("one", 1.0, 5, exact=False),
                "threshold": case(
                    "thr", 40.0, None, writer_goal_ms=10, flips=10, **{"from": 0.5, "to": 0.55}
                ),
                "per_row_10": case("k10", 30.0, None),
            },
            "per_row": [{"k": 10, "drain_ms": 30.0, "drain_ms_per_row": 3.0}],
        }
    }
    got = {row[1].split(":")[0]: row for row in rows(results)}
    assert got["add"][2:] == ("12.0 ms", "2.0 ms", "", "≤ 20 ms", "ok")
    assert got["bulk"][-1] == "MISSED"
    assert "(NOT EXACT)" in got["one"][1] and got["one"][-1] == "MISSED", "fast but wrong"
    assert got["thr"][2] == "2.0 ms" and got["thr"][-2:] == ("≤ 10 ms", "ok"), "writer time"
    (flip,) = [row for row in rows(results) if "per flip (B)" in row[1]]
    assert flip[2:4] == ("40.0 ms", "4 ms") and "10 occurrences scored in [0.5, 0.55)" in flip[1]
    assert got["k10"][2:4] == ("30.0 ms", "3 ms")


def test_the_shapes_section_times_each_shape_at_each_size_on_exact_counts(tmp_path):
    """The test app's shapes at two tiny sizes: every case ran, each size's drain was checked
    exact (the section raises otherwise), and the table judges each against its goal."""
    from bench import shapes

    figures, out = tmp_path / "shapes.json", StringIO()
    call_command(
        "bench",
        sections="shapes",
        shapes_sizes="200,800",
        shapes_repeats=1,
        json_path=str(figures),
        plot="",
        stdout=out,
        stderr=StringIO(),
    )
    data = json.loads(figures.read_text())["shapes"]
    assert data["sizes"] == [200, 800]
    for case in shapes.CASES:
        medians = data["median"][case]["ms"]
        assert sorted(int(n) for n in medians) == [200, 800] and positive(*medians.values())
    assert positive(*data["median"]["three_level"]["full_ms"].values())
    table = out.getvalue()
    assert sum(line.startswith("shapes") for line in table.splitlines()) == 3 * (2 + 1)
    assert "the engine's test app, targets of 200, 800 children" in table
    assert not DirtyMark.objects.exists(), "the section left marks pending"
    # Its check sees a count the drain left wrong.
    size = shapes._present(800)
    _corrupt(
        "UPDATE counts_testapp_library SET reviews_count = reviews_count + 1 WHERE id = %s",
        [size["library"]],
    )
    with pytest.raises(CommandError, match="counts differ from the truth at 800"):
        shapes._check(size)


def test_the_hand_written_baseline_keeps_the_same_state_as_the_engine():
    """The reconcile and rebuild sections compare the engine with ``bench.baseline``: the
    comparison is like for like only if the baseline computes every count, ledger entry and
    multiplicity the engine keeps. On exact data its dry passes find nothing; a baseline repair
    of wiped state writes what the engine then finds exact (a baseline missing a count wrote
    ledgers the engine "repaired" on every later pass)."""
    import counts
    from bench import baseline
    from bench.rebuild import wipe
    from counts.declare.graph import app_graph

    call_command("seed_demo", scale=500, stdout=StringIO(), stderr=StringIO())
    for chunked in (False, True):
        found = baseline.run_pass(dry=True, chunked=chunked)
        assert (found.drifted_rows, found.ledgers_drifted, found.pairs_drifted) == (0, 0, 0)
        assert found.checked == baseline.target_rows() and found.ledgers_checked > 0

    wipe()
    repaired = baseline.run_pass(dry=False, chunked=True)
    assert repaired.drifted_rows > 0 and repaired.ledgers_drifted > 0
    assert repaired.pairs_drifted > 0
    report = counts.reconcile(dry_run=True)
    assert report.drifted_rows == 0, report.as_dict()
    assert all(ledger.drifted_rows == 0 for ledger in report.ledgers.values()), report.as_dict()
    # Every table the engine keeps counts on is in the baseline, with every column.
    specs = app_graph().specs
    kept = {(s.target.label, s.column) for s in specs if s.target.label.startswith("monitoring.")}
    assert kept == {(t.label, c) for t in baseline.TABLES for c in t.columns}


def test_the_backfill_section_adds_the_count_back_exact_with_and_without_a_drainer(tmp_path):
    """Each of the five samples ran its writer and ended exact (the count's column and ledger
    entries equal the truth, no mark left); beside a drainer, the writer's marks were drained
    while they were made, never waiting long; the scratch copy is gone afterwards."""
    from bench import backfill, scratch

    figures = tmp_path / "backfill.json"
    call_command(
        "bench",
        scale=2000,
        sections="backfill",
        backfill_repeats=1,
        backfill_idle=1.0,
        json_path=str(figures),
        plot="",
        stdout=StringIO(),
        stderr=StringIO(),
    )
    data = json.loads(figures.read_text())["backfill"]
    assert data["exact"]
    for variant in backfill.VARIANTS:
        assert data[variant]["writes"] > 0 and positive(data[variant]["p99_ms"]), variant
    for variant in ("idle_drained", "engine_drained", "baseline_drained"):
        assert "batches_drained" in data[variant], variant
    assert data["idle_drained"]["batches_drained"] > 0, "the drainer drained nothing"
    assert 0 <= data["idle_drained"]["oldest_mark_max_s"] < 5
    assert positive(
        data["p99_ratio"], data["p99_ratio_drained"], data["p99_ratio_baseline_drained"]
    )
    assert data["baseline_drained"]["exact_while_drained"] in (0, 1), "the racing pass: exact?"
    assert not DirtyMark.objects.exists(), "the section left marks pending"
    copy = scratch._name(connection.settings_dict["NAME"])
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [copy])
        assert cursor.fetchone()[0] == 0
