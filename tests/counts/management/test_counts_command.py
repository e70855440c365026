"""``manage.py counts`` as an operator meets it: help for every option, progress on a terminal.

The reconcile runs in a subprocess whose output is a real pseudo-terminal (or a pipe), because
what it prints depends on exactly that.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from counts.management.commands.counts import Command
from tests import worker_harness as wh
from tests.truth import assert_all_counts_exact


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = Command().create_parser("manage.py", "counts")
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_counts_subcommand_option_says_what_it_does():
    for name, parser in subparsers().items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"counts {name} {action.option_strings} has no help text"


def run_on_terminal(args: list[str], env: dict, timeout: float = 120) -> str:
    """Run ``manage.py`` with stdout and stderr on a pseudo-terminal; returns what it showed."""
    main, terminal = os.openpty()
    # A terminal has a size (a bare pty is 0x0, where tqdm draws an empty bar): 24 rows, 120.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=wh.ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(main, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main)
        process.wait(timeout=30)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.django_db(transaction=True)
def test_reconcile_shows_a_progress_bar_with_total_and_eta_only_on_a_terminal(world):
    env = wh.worker_subprocess_env()
    args = ["counts", "reconcile", "--dry-run", "--chunk", "2"]
    shown = run_on_terminal(args, env)
    # One bar per model, its total the model's row count, with a rate and time left.
    assert re.search(r"monitoring\.sourceimage: 100%\|[^|]*\| 5/5 \[\d\d:\d\d<\d\d:\d\d", shown)
    assert re.search(r"monitoring\.event: 100%\|[^|]*\| 3/3 ", shown), shown
    assert "monitoring.sourceimage: 5 checked, 0 would repair (no drift)" in shown

    piped = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=wh.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stderr + piped.stdout and "\r" not in piped.stderr
    assert "monitoring.sourceimage: 5 checked, 0 would repair (no drift)" in piped.stdout
    assert_all_counts_exact()


@pytest.mark.django_db
def test_status_exits_2_and_names_a_model_whose_due_marks_wait_too_long(capsys, live_processes):
    """An alert can page someone instead of a status that says "pending" forever."""
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    from counts.models import DirtyMark

    label = "monitoring.event"
    DirtyMark.objects.all().delete()  # transactional tests' TRUNCATEs leave "every row" marks
    long_ago = timezone.now() - timedelta(minutes=10)
    # Written long ago but put back for a held row, due in an hour: waiting, not stale.
    DirtyMark.objects.create(target=label, ids=[1], not_before=timezone.now() + timedelta(hours=1))
    DirtyMark.objects.update(created_at=long_ago)
    call_command("counts", "status")
    assert "oldest due 0.0s" in capsys.readouterr().out
    DirtyMark.objects.create(target=label, ids=[2])
    DirtyMark.objects.filter(not_before=None).update(created_at=long_ago)
    with pytest.raises(SystemExit) as exited:
        call_command("counts", "status")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert label in err and "COUNTS_STALE_ALERT_S" in err


@pytest.mark.django_db
def test_status_exits_2_when_no_worker_has_been_seen_lately(capsys, live_processes):
    from django.core.management import call_command

    from counts.models import DirtyMark
    from workers import heartbeat
    from workers.redis_client import key

    DirtyMark.objects.all().delete()
    call_command("counts", "status")
    capsys.readouterr()
    heartbeat.forget(heartbeat.WORKER, "test-host:1")
    heartbeat.beat(heartbeat.WORKER, "test-host:2")
    seen = key("heartbeat", heartbeat.WORKER, "test-host:2")
    wh.client().set(seen, int(wh.client().time()[0]) - 40)  # two heartbeats missed
    with pytest.raises(SystemExit) as exited:
        call_command("counts", "status")
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert "worker:test-host:2" in out and "STALE" in out
    assert "worker: no live worker process seen" in err
