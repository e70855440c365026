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

import pytest
import redis
from django.test import override_settings

from tests import worker_harness as wh
from tests.paths import ROOT
from workers import heartbeat
from workers import redis_client as workers_redis
from workers.schedule import Scheduler


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
    return run_python(env, "manage.py", *args, timeout=timeout)


def run_python(env: dict, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python *argv`` in the project's folder with ``env``; output captured as text."""
    return subprocess.run(
        [sys.executable, *argv],
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
    result = run_python(env, "-c", API_PROBE)
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


@pytest.mark.parametrize(
    "argv", [("counts", "reconcile"), ("counts", "rebuild"), ("counts", "drain"), ("migrate",)]
)
def test_commands_say_one_line_when_postgresql_does_not_answer(argv):
    result = run_manage(dead_services_env(), *argv)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "PostgreSQL at 127.0.0.1:" in line and "does not answer" in line


@pytest.mark.django_db
def test_head_answers_like_get_without_a_warning(client, own_redis, caplog):
    """Load balancers and uptime monitors probe with HEAD: not a 405 and a WARNING each."""
    heartbeat.beat(heartbeat.SCHEDULER)
    for path in ("/healthz", "/readyz", "/metrics"):
        get = client.get(path)
        head = client.head(path)
        assert (head.status_code, head["Content-Type"]) == (get.status_code, get["Content-Type"])
        assert head.status_code == 200, path
        assert head.content == b""
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []  # WARNING+


@pytest.mark.django_db
def test_failing_readyz_logs_once_per_outage_and_once_when_ready_again(client, own_redis, caplog):
    heartbeat.beat(heartbeat.SCHEDULER)
    assert readyz(client)[0] == 200
    caplog.clear()
    with override_settings(COUNTS_SCHEDULER_STALE_S=-1):
        assert [readyz(client)[0] for _ in range(5)] == [503] * 5
    assert readyz(client)[0] == 200
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= 30]
    assert len(lines) == 2, lines
    assert lines[0][0] == "ERROR" and lines[0][1].startswith("not ready (scheduler): scheduler:")
    assert lines[1][0] == "WARNING" and lines[1][1].startswith("ready again after")


#: With DEBUG on: a 403 from the admin (a signed-in staff user without permissions) and a 503.
DEBUG_LOG_PROBE = """
import sys, django
django.setup()
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client
client = Client()
client.force_login(User.objects.get(username=sys.argv[1]))
print("403", client.get("/admin/auth/user/add/", HTTP_HOST="127.0.0.1").status_code, flush=True)
connections["default"].settings_dict["PORT"] = sys.argv[2]
connections["default"].close()
print("503", client.get("/api/v2/captures/collections/", HTTP_HOST="127.0.0.1").status_code)
"""


@pytest.mark.django_db(transaction=True)  # the subprocess must see the user
def test_with_debug_on_a_403_and_a_503_are_one_line_each_without_traceback():
    from django.contrib.auth.models import User

    User.objects.create_user("staff-no-perms", password="x", is_staff=True)
    env = wh.worker_subprocess_env(DEBUG="1", DJANGO_SETTINGS_MODULE="project.settings")
    result = run_python(env, "-c", DEBUG_LOG_PROBE, "staff-no-perms", str(free_port()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["403", "403", "503", "503"]
    assert "Traceback" not in result.stderr
    forbidden = [line for line in result.stderr.splitlines() if "/admin/auth/user/add/" in line]
    assert len(forbidden) == 1 and "WARNING django.request Forbidden" in forbidden[0], forbidden
    api = [line for line in result.stderr.splitlines() if "/api/v2/captures/collections/" in line]
    assert len(api) == 1 and "database unavailable for GET" in api[0], result.stderr


#: A signed-in admin's browser (it sends its session cookie) when PostgreSQL is down.
ADMIN_PROBE = """
import json, django
django.setup()
from django.test import Client
client = Client()
client.cookies["sessionid"] = "a-session-the-database-must-be-asked-about"
browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
answers = {}
for name, path, accept in [("admin", "/admin/", browser), ("admin_any", "/admin/", "*/*"),
                           ("api_json", "/api/v2/captures/collections/", "application/json")]:
    r = client.get(path, HTTP_HOST="127.0.0.1", HTTP_ACCEPT=accept)
    answers[name] = {"status": r.status_code, "type": r["Content-Type"],
                     "retry": r.get("Retry-After"), "body": r.content.decode()[:2000]}
print(json.dumps(answers))
"""


def test_admin_gets_an_html_503_page_and_the_api_json_when_postgresql_is_down():
    env = dead_services_env(DJANGO_SETTINGS_MODULE="project.settings", DEBUG="0")
    result = run_python(env, "-c", ADMIN_PROBE)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("admin", "admin_any"):
        page = answers[name]
        assert page["status"] == 503 and page["type"].startswith("text/html"), page
        assert page["retry"] == "10"
        assert "<h1>Database unavailable</h1>" in page["body"]
        assert "The database is unavailable; try again shortly." in page["body"]
    api = answers["api_json"]
    assert api["status"] == 503 and api["type"] == "application/json"
    assert json.loads(api["body"]) == {"detail": "The database is unavailable; try again shortly."}
