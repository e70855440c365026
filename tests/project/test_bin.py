"""The bin scripts as a person runs them: the URL printed is the one served, failures say what.

These start real subprocesses (``bin/run`` with honcho, gunicorn, rundramatiq and the
scheduler; ``bin/_env.sh`` with its own Redis) and always stop them; the last check of each
test is that nothing it started is left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.paths import ROOT

#: The database bin/run gets: created by the script, dropped by the test.
RUN_DB_SUFFIX = "_binrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries ``COUNTDOWN_TEST_MARK=mark``."""
    needle = f"COUNTDOWN_TEST_MARK={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
    return found


def kill_marked(mark: str) -> list[int]:
    left = marked_processes(mark)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def env_for(mark: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    return {**env, "COUNTDOWN_TEST_MARK": mark, **extra}


def run_env_sh(
    env: dict[str, str], script: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Source bin/_env.sh in bash, then run ``script`` in the same shell."""
    return subprocess.run(
        ["bash", "-c", f"source bin/_env.sh\n{script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_env_names_a_dead_postgres_address_at_once_and_starts_nothing_there():
    port = free_port()
    mark = uuid.uuid4().hex
    url = f"postgres://postgres@127.0.0.1:{port}/countdown_nowhere"
    started = time.monotonic()
    result = run_env_sh(env_for(mark, DATABASE_URL=url), "echo reached", timeout=30)
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "reached" not in result.stdout
    assert "starting PostgreSQL" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr, result.stderr
    assert "unset DATABASE_URL" in result.stderr
    assert took < 20, f"took {took:.0f}s to say the address is dead"
    assert not listening(port), "nothing may be started on the caller's port"
    assert kill_marked(mark) == []


def test_env_starts_its_own_redis_says_where_and_can_stop_it():
    port = free_port()
    mark = uuid.uuid4().hex
    env = env_for(mark, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        result = run_env_sh(
            env, 'echo "own=$OWN_REDIS_PORT"; redis-cli -p "$OWN_REDIS_PORT" ping; stop_own_redis'
        )
        assert result.returncode == 0, result.stderr
        assert f"starting Redis on 127.0.0.1:{port}" in result.stderr
        assert f"var/redis/redis-{port}.log" in result.stderr
        assert f"own={port}" in result.stdout
        assert "PONG" in result.stdout
        assert not listening(port), "stop_own_redis stops the server it started"
    finally:
        assert kill_marked(mark) == [], "a process was left running"


def start_bin_run(
    mark: str, database_url: str, web_port: int, redis_port: int, lines: list[str]
) -> tuple[subprocess.Popen, threading.Thread]:
    """``bin/run`` on its own database, web port and Redis port, in a session of its own (as a
    terminal's foreground job); its output is collected into ``lines``."""
    env = env_for(
        mark,
        DATABASE_URL=database_url,
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        WEB_PORT=str(web_port),
    )
    process = subprocess.Popen(
        ["bin/run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, _reader(process, lines)


def ctrl_c(process: subprocess.Popen, reader: threading.Thread, mark: str) -> list[int]:
    """What Ctrl-C in the terminal does (SIGINT to the whole foreground group); then wait for
    everything ``bin/run`` started to stop. Returns the pids still running (killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    reader.join(timeout=5)
    deadline = time.monotonic() + 30
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    return kill_marked(mark)


def _reader(process: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read():
        for line in process.stdout:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate, timeout: float, what: str, lines: list[str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout}s; output:\n{''.join(lines[-60:])}")


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return None


@contextlib.contextmanager
def throwaway_database():
    """A database name for bin/run to create; dropped (with its connections) afterwards."""
    base = urllib.parse.urlparse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/countdown")
    )
    name = (base.path.lstrip("/") or "countdown") + RUN_DB_SUFFIX
    params = {"host": base.hostname, "port": base.port or 5432, "user": base.username or "postgres"}

    def drop():
        with psycopg.connect(
            **params, password=base.password, dbname="postgres", autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    try:
        yield base._replace(path=f"/{name}").geturl()
    finally:
        drop()


@pytest.mark.slow
def test_bin_run_serves_the_url_it_prints_and_leaves_nothing_running():
    mark, web_port, redis_port = uuid.uuid4().hex, free_port(), free_port()
    lines: list[str] = []
    with throwaway_database() as database_url:
        process, reader = start_bin_run(mark, database_url, web_port, redis_port, lines)
        try:

            def printed_admin():
                for line in lines:
                    if m := re.search(r"admin:\s+(http://\S+/admin/)", line):
                        return m.group(1)
                assert process.poll() is None, "bin/run exited:\n" + "".join(lines)
                return None

            admin = _wait_for(printed_admin, 300, "the printed admin URL", lines)
            assert admin == f"http://127.0.0.1:{web_port}/admin/"
            assert f"starting Redis on 127.0.0.1:{redis_port}" in "".join(lines)
            login = admin + "login/"
            _wait_for(lambda: _get(login) == 200, 120, f"200 from {login}", lines)
            # The real scheduler and workers beat: the deployment becomes ready on its own.
            readyz = admin.replace("/admin/", "/readyz")
            _wait_for(lambda: _get(readyz) == 200, 120, f"200 from {readyz}", lines)
            assert _get(admin.replace("/admin/", "/metrics")) == 200
        finally:
            left = ctrl_c(process, reader, mark)
    assert left == [], f"left running after bin/run stopped: {left}"
    assert not listening(web_port) and not listening(redis_port)
    assert "stopping the Redis started" in "".join(lines)


def test_env_keeps_the_generated_secret_key_readable_by_its_owner_only():
    key = ROOT / "var" / "secret_key"
    if not key.exists():
        pytest.skip("no generated key here: SECRET_KEY came from the environment")
    key.chmod(0o644)  # as an earlier version wrote it
    env = {k: v for k, v in env_for(uuid.uuid4().hex).items() if k != "SECRET_KEY"}
    result = run_env_sh(env, "stat -c %a var/secret_key")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "600"


def _head(url: str) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return None


@pytest.mark.slow
def test_ctrl_c_on_bin_run_lets_every_worker_process_shut_down_gracefully():
    """Ctrl-C reaches honcho once, and each dramatiq worker process gets one SIGTERM: a second
    one makes dramatiq kill the worker instead of letting it finish its messages. Meanwhile
    gunicorn keeps its control socket to this checkout and port, and HEAD probes are quiet."""
    mark, web_port, redis_port = uuid.uuid4().hex, free_port(), free_port()
    lines: list[str] = []
    ctl = ROOT / "var" / f"gunicorn-{web_port}.ctl"
    with throwaway_database() as database_url:
        process, reader = start_bin_run(mark, database_url, web_port, redis_port, lines)
        try:
            base = f"http://127.0.0.1:{web_port}"
            _wait_for(lambda: _get(f"{base}/readyz") == 200, 300, "200 from /readyz", lines)
            ready = "Worker process is ready for action"
            _wait_for(lambda: "".join(lines).count(ready) == 2, 60, "both workers", lines)
            assert _head(f"{base}/healthz") == 200 and _head(f"{base}/readyz") == 200
            assert ctl.is_socket(), "gunicorn's control socket is var/gunicorn-<port>.ctl"
        finally:
            left = ctrl_c(process, reader, mark)
    output = "".join(lines)
    assert left == [], f"left running after bin/run stopped: {left}"
    assert re.findall(r"system\s+\| (SIG\w+) received", output) == ["SIGTERM"], output
    assert "Killing worker process" not in output, output
    assert output.count("Worker has been shut down.") == 2, output
    assert re.search(r"worker\.1 stopped \(rc=0\)", output), output
    assert "Method Not Allowed" not in output and "HEAD /healthz" in output
    assert not ctl.exists(), "gunicorn removes its control socket when it stops"
