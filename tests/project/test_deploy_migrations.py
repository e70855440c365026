"""A deploy that adds counts in several migrations migrates forward with data.

What a maintainer does, in a scratch copy of this tree: load data, declare a count and run
``makemigrations``, declare another and run it again, then ``migrate`` the database that holds
data and sits before both — as every production database that skipped a release would. The
first backfill runs while the second count's column does not exist yet; the migration must
still succeed and the counts end exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection

from tests.paths import ROOT

THRESHOLD_LINE = "    default_filters_score_threshold = models.FloatField(default=0.5)\n"
COUNTS = [
    'deploy_check_captures_count = CachedCountField("deployments__captures")',
    'deploy_check_events_count = CachedCountField("deployments__events")',
]

#: A second model's line, and a count declared after it (the same truth as ``events_count``).
STATION_LINE = '    events_count = CachedCountField("events")\n'
STATION_COUNT = 'deploy_check_nights_count = CachedCountField("events")'

pytestmark = pytest.mark.slow


def not_filled(stderr: str) -> list[str]:
    """The warnings of backfills that left their counts to the workers."""
    return [
        line for line in stderr.splitlines() if " WARNING " in line and "not backfilled" in line
    ]


def _admin_connection():
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )


@pytest.fixture
def scratch(tmp_path):
    """A copy of the tracked tree and an empty database of its own."""
    tree = tmp_path / "tree"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    name = f"countdown_deploy_{os.getpid()}"
    db = connection.settings_dict
    with _admin_connection() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{name}",
        "DEBUG": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)

    def manage(*args: str, expect: int = 0, stderr: list | None = None, **extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=tree,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == expect, (
            f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        )
        if stderr is not None:
            stderr.append(done.stderr)
        return done.stdout

    yield tree, manage, name
    with _admin_connection() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def declare(tree: Path, line: str, after: str = THRESHOLD_LINE) -> None:
    """Declare ``line`` in the model whose body holds the line ``after`` (Project's, by default)."""
    models = tree / "project" / "monitoring" / "models.py"
    text = models.read_text()
    assert text.count(after) == 1, after
    models.write_text(text.replace(after, f"{after}    {line}\n", 1))


def test_two_count_adding_migrations_apply_in_one_migrate_on_a_database_with_data(scratch):
    tree, manage, dbname = scratch
    fresh, skipping = [], []
    manage("migrate", "--no-input", "-v", "0", stderr=fresh)
    manage("seed_demo", "--scale", "2000")
    for line in COUNTS:  # two releases, each adding a count
        declare(tree, line)
        assert "Count triggers: wrote" in manage("makemigrations", "monitoring")
    manage("migrate", "--no-input", "-v", "0", stderr=skipping)  # skipping a release: both at once
    # The first backfill cannot run (the second count's column is not there yet): with data,
    # the operator is warned that the workers will fill it; on a fresh install, with nothing
    # to fill, migrate says nothing of it.
    assert any("monitoring.project:" in line for line in not_filled(skipping[0])), skipping[0]
    assert not not_filled(fresh[0]), fresh[0]
    manage("counts", "drain", "--until-empty")
    report = json.loads(manage("counts", "reconcile", "--dry-run", "--json"))
    assert report["drifted_rows"] == 0, json.dumps(report)
    assert "monitoring.project" in report["models"], json.dumps(report)
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], dbname=dbname
    ) as conn:
        rows = conn.execute(
            "SELECT p.deploy_check_captures_count, p.deploy_check_events_count,"
            " (SELECT count(*) FROM monitoring_sourceimage si JOIN monitoring_deployment d"
            "  ON d.id = si.deployment_id WHERE d.project_id = p.id),"
            " (SELECT count(*) FROM monitoring_event e JOIN monitoring_deployment d"
            "  ON d.id = e.deployment_id WHERE d.project_id = p.id)"
            " FROM monitoring_project p"
        ).fetchall()
    assert rows and all(r[0] == r[2] > 0 and r[1] == r[3] > 0 for r in rows), rows


def exact(manage) -> None:
    """Drained to empty, a dry-run reconcile finds nothing to repair."""
    manage("counts", "drain", "--until-empty")
    report = json.loads(manage("counts", "reconcile", "--dry-run", "--json"))
    assert report["drifted_rows"] == 0, json.dumps(report)
    assert not any(k["drifted_rows"] for k in report["ledgers"].values()), json.dumps(report)


def killed_migrating(manage, step: str) -> None:
    """``migrate`` SIGKILLed at the checkpoint ``step``, its backfill's lease left to lapse."""
    manage(
        "migrate",
        "--no-input",
        "-v",
        "0",
        expect=-9,
        COUNTS_CHECKPOINTS=f"{step}=kill",
        COUNTS_BACKFILL_LEASE_S="0.2",
    )
    assert "[ ] 0013_count_triggers" in manage("showmigrations", "monitoring")
    time.sleep(0.5)  # the lease lapses: what the backfill left is the workers' now


@pytest.mark.parametrize(
    "step", ["sweep.locked@1", "bulk.between_transactions@1", "recount.before_formula@1"]
)
def test_a_backfill_killed_part_way_is_finished_by_the_workers_or_by_migrate_again(scratch, step):
    """SIGKILL in the middle of a count's backfill: the triggers are in, the migration is not
    recorded. Once the backfill's lease lapses the workers' drains bring every count to the
    truth; running ``migrate`` again completes the migration, and counts stay exact."""
    tree, manage, _dbname = scratch
    manage("migrate", "--no-input", "-v", "0")
    manage("seed_demo", "--scale", "2000")
    declare(tree, COUNTS[0])
    assert "Count triggers: wrote" in manage("makemigrations", "monitoring")
    killed_migrating(manage, step)
    exact(manage)
    manage("migrate", "--no-input", "-v", "0")
    assert "[X] 0013_count_triggers" in manage("showmigrations", "monitoring")
    exact(manage)


def test_a_backfill_killed_between_two_targets_is_finished_by_the_workers(scratch):
    """One migration adds counts to two models; ``migrate`` is killed after the first target's
    backfill, before the second's. The second's new counts are zeros with no ledger entry:
    only the lease taken for every target before the first covers them, and once it lapses
    the workers' drains fill them."""
    tree, manage, _dbname = scratch
    manage("migrate", "--no-input", "-v", "0")
    manage("seed_demo", "--scale", "2000")
    declare(tree, COUNTS[0])
    declare(tree, STATION_COUNT, after=STATION_LINE)
    assert "Count triggers: wrote" in manage("makemigrations", "monitoring")
    killed_migrating(manage, "backfill.next_target@2")
    exact(manage)
