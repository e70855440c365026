"""What an operator sees when something is down: /healthz, /readyz, 503s and one-line errors.

Faults are real: a redis-server of our own on a free port that the test stops, a scheduler
that has not beaten, and subprocesses pointed at a PostgreSQL port where nothing listens.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.test import override_settings

from tests import worker_harness as wh
from workers import heartbeat
from workers import redis_client as workers_redis
from workers.schedule import Scheduler

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, the workers' client pointed at it; yields its process."""
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    wh.wait_until(lambda: _pings(r), timeout=10)
    workers_redis.reset()
    try:
        with override_settings(REDIS_URL=url):
            yield server
    finally:
        server.kill()
        server.wait(timeout=10)
        workers_redis.reset()


def _pings(r) -> bool:
    try:
        return r.ping()
    except redis.RedisError:
        return False


@pytest.fixture
def clean_redis():
    wh.reset_redis()
    yield
    wh.reset_redis()


def readyz(client) -> tuple[int, dict]:
    response = client.get("/readyz")
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()


def test_healthz_answers_without_touching_anything(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.django_db(transaction=True)  # the sweep job closes old connections, as it must
def test_readyz_is_200_when_everything_answers_and_the_scheduler_swept(client, own_redis):
    Scheduler().run_sweep()  # the real sweep job beats for the scheduler
    status, body = readyz(client)
    assert status == 200, body
    assert body["ready"] is True and body["failed"] == []
    assert body["checks"]["triggers"]["detail"].endswith("installed")


@pytest.mark.django_db
def test_readyz_is_503_naming_redis_when_redis_stops(client, own_redis):
    heartbeat.beat(heartbeat.SCHEDULER)
    assert readyz(client)[0] == 200
    own_redis.kill()
    own_redis.wait(timeout=10)
    status, body = readyz(client)
    assert status == 503
    assert body["failed"] == ["redis", "scheduler"]
    assert "does not answer" in body["checks"]["redis"]["detail"]
    assert body["checks"]["postgresql"]["ok"] and body["checks"]["triggers"]["ok"]


@pytest.mark.django_db
def test_readyz_is_503_when_the_scheduler_has_not_been_seen(client, own_redis):
    status, body = readyz(client)
    assert status == 503 and body["failed"] == ["scheduler"]
    assert "run_scheduler" in body["checks"]["scheduler"]["detail"]
    heartbeat.beat(heartbeat.SCHEDULER)
    with override_settings(COUNTS_SCHEDULER_STALE_S=-1):
        status, body = readyz(client)
    assert status == 503 and "last seen" in body["checks"]["scheduler"]["detail"]


def test_worker_processes_beat_and_status_says_when_each_was_seen(clean_redis):
    assert "no worker seen" in heartbeat.describe()["worker"]
    with wh.running_worker(threads=1):
        workers = [n for n in heartbeat.last_seen() if n.startswith("worker:")]
        assert len(workers) == 1
    assert not [n for n in heartbeat.last_seen() if n.startswith("worker:")], "clean stop"


@pytest.mark.django_db
def test_pending_marks_page_says_when_the_scheduler_and_workers_were_seen(
    admin_client, clean_redis
):
    heartbeat.beat(heartbeat.SCHEDULER)
    heartbeat.beat(heartbeat.WORKER, "host-a:123")
    page = admin_client.get("/admin/counts/dirtymark/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Processes last seen" in html
    assert re.search(r"<td>scheduler</td><td>last seen \d+ s ago</td>", html), html
    assert "<td>worker:host-a:123</td>" in html


def dead_services_env(**extra: str) -> dict:
    """A subprocess environment whose PostgreSQL port answers nothing."""
    env = wh.worker_subprocess_env()
    return {**env, "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/nowhere", **extra}


def run_manage(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_counts_status_says_one_line_per_unreachable_service():
    env = dead_services_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    result = run_manage(env, "counts", "status")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("PostgreSQL at 127.0.0.1:") and "does not answer" in lines[0]
    assert lines[1].startswith("Redis at 127.0.0.1:") and "does not answer" in lines[1]


@pytest.mark.django_db(transaction=True)
def test_counts_status_with_postgresql_down_still_reports_redis_side(clean_redis):
    heartbeat.beat(heartbeat.SCHEDULER)
    heartbeat.beat(heartbeat.WORKER, "test-host:1")
    result = run_manage(dead_services_env(), "counts", "status")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "PostgreSQL at" in result.stderr
    assert "scheduler" in result.stdout and "last seen" in result.stdout


#: Requests the API in a process whose DATABASE_URL points at a dead port.
API_PROBE = """
import json, django
django.setup()
from django.test import Client
client = Client()
client.cookies["sessionid"] = "a-session-the-database-must-be-asked-about"
r = client.get("/api/v2/captures/collections/", HTTP_HOST="127.0.0.1")
print(json.dumps({"status": r.status_code, "type": r["Content-Type"], "size": len(r.content),
                  "body": r.content.decode()[:500]}))
"""


def test_api_answers_503_with_a_json_detail_when_postgresql_is_down():
    env = dead_services_env(DJANGO_SETTINGS_MODULE="project.settings", DEBUG="1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", API_PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == 503, answer
    assert answer["type"] == "application/json"
    assert json.loads(answer["body"]) == {
        "detail": "The database is unavailable; try again shortly."
    }
    assert answer["size"] < 200
    assert "Traceback" not in result.stderr
    assert "database unavailable for GET /api/v2/captures/collections/" in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.django_db
def test_readyz_stays_200_with_a_stale_backlog_that_is_the_workers_business(client, own_redis):
    """A backlog the workers are not draining pages through ``counts status`` and /metrics;
    it must not take the web tier, which can serve perfectly well, out of rotation."""
    from datetime import timedelta

    from django.utils import timezone

    from counts.models import DirtyMark

    DirtyMark.objects.create(target="monitoring.event", ids=[1])
    DirtyMark.objects.update(created_at=timezone.now() - timedelta(hours=1))
    heartbeat.beat(heartbeat.SCHEDULER)
    status, body = readyz(client)
    assert status == 200, body


@pytest.mark.parametrize("action", ["reconcile", "rebuild", "drain"])
def test_counts_commands_say_one_line_when_postgresql_does_not_answer(action):
    result = run_manage(dead_services_env(), "counts", action)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "PostgreSQL at 127.0.0.1:" in line and "does not answer" in line
