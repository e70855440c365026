"""Progress of the bulk passes (``counts.operate.progress``): bars on a terminal, lines elsewhere,
and never a byte of it on stdout, where ``--json`` reports go."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.core.management import call_command

import counts
from counts.operate.progress import Progress, backfill_progress, phase_name

#: The line a phase leaves when the output is no terminal.
LINE = re.compile(r"^(?P<phase>.+): (?P<rows>\d+) rows in \d+\.\d s \(\d+ rows/s\)$")


class FakeTerminal(StringIO):
    """A stream that says it is a terminal, and keeps what was drawn on it."""

    def isatty(self) -> bool:
        return True


def phases(text: str) -> dict[str, int]:
    """``{phase: rows}`` of the progress lines in ``text``; every line must be one."""
    found = {}
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"not a progress line: {line!r}"
        found[match["phase"]] = int(match["rows"])
    return found


def with_rows() -> dict[str, int]:
    return {label: rows for label, rows in counts.target_rows().items() if rows}


@pytest.mark.django_db
def test_reconcile_off_a_terminal_writes_a_line_per_model_to_stderr(world):
    out, err = StringIO(), StringIO()
    call_command("counts", "reconcile", "--chunk", "2", stdout=out, stderr=err)
    seen = phases(err.getvalue())
    for label, rows in with_rows().items():
        assert seen[label] == rows
    assert not [line for line in out.getvalue().splitlines() if LINE.match(line)]
    assert "\r" not in err.getvalue() and "%|" not in err.getvalue()
    assert "monitoring.sourceimage: 5 checked, 0 repaired (no drift)" in out.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize("action", [["reconcile", "--dry-run"], ["rebuild"]])
def test_json_on_stdout_keeps_its_keys_and_progress_stays_on_stderr(world, action):
    out, err = StringIO(), StringIO()
    call_command("counts", *action, "--json", "--chunk", "2", stdout=out, stderr=err)
    report = json.loads(out.getvalue())  # nothing but the JSON
    assert {"checked", "drifted_rows", "models", "seconds"} <= set(report)
    assert report["drifted_rows"] == 0
    assert set(with_rows()) <= set(report["models"])
    assert phases(err.getvalue())["monitoring.sourceimage"] == 5


@pytest.mark.django_db
def test_reconcile_on_a_terminal_draws_a_bar_per_model_over_its_rows(world):
    err = FakeTerminal()
    call_command("counts", "reconcile", "--dry-run", "--chunk", "2", stdout=StringIO(), stderr=err)
    shown = err.getvalue()
    assert re.search(r"monitoring\.sourceimage: 100%\|[^|]*\| 5/5 \[\d\d:\d\d<\d\d:\d\d", shown)
    assert re.search(r"monitoring\.event: 100%\|[^|]*\| 3/3 ", shown), shown
    assert not LINE.search(shown.replace("\r", "\n"))  # bars, not lines


def test_a_bar_without_a_total_for_a_phase_it_cannot_size():
    stream = FakeTerminal()
    with Progress(stream, totals={"monitoring.event": 4}) as progress:
        progress("item:monitoring.sourceimage", 2)
        progress("item:monitoring.sourceimage", 7)
        progress("monitoring.event", 2)
        progress("monitoring.event", 4)
    shown = stream.getvalue()
    assert re.search(r"monitoring\.sourceimage items \(ledgers\): 7rows \[", shown), shown
    assert re.search(r"monitoring\.event: 100%\|[^|]*\| 4/4 ", shown), shown
    assert [(phase, rows) for phase, rows, _ in progress.finished] == [
        ("monitoring.sourceimage items (ledgers)", 7),
        ("monitoring.event", 4),
    ]


def test_a_total_grown_meanwhile_is_no_overflow():
    stream = FakeTerminal()
    with Progress(stream, totals={"monitoring.event": 3}) as progress:
        progress("monitoring.event", 5)
    assert re.search(r"monitoring\.event: 100%\|[^|]*\| 5/5 ", stream.getvalue())


def test_off_a_terminal_totals_are_never_counted():
    def totals():
        raise AssertionError("counted rows for nothing")

    stream = StringIO()
    with Progress(stream, totals) as progress:
        progress("monitoring.event", 1)
        progress("item:monitoring.sourceimage", 3)
    assert phases(stream.getvalue()) == {
        "monitoring.event": 1,
        "monitoring.sourceimage items (ledgers)": 3,
    }


def test_phase_names():
    assert phase_name("monitoring.event") == "monitoring.event"
    assert phase_name("item:monitoring.sourceimage") == "monitoring.sourceimage items (ledgers)"


@pytest.mark.django_db
def test_backfill_progress_writes_to_stderr(world, capsys):
    with backfill_progress(["monitoring.event"]) as progress:
        counts.reconcile(model="monitoring.event", dry_run=True, chunk=2, progress=progress)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert phases(captured.err)["monitoring.event"] == 3
