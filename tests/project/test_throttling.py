"""Password guessing is stopped and request rates are limited, in Redis; a Redis outage is not.

Measured before: 60 wrong passwords to /api/auth/token/ in 22 s all got a 400, and 40 wrong
admin logins did not keep the right password out. Every test here sends real requests through
Django's test client (each "client" is a ``REMOTE_ADDR``) and reads what that client sees:
status codes, ``Retry-After``, whether a session was opened, the log lines an operator sees.
The counts live in the real Redis, under this test process's own key prefix (emptied after
each test by ``tests/conftest.py``); outages use a Redis of the test's own or a closed port.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client, override_settings

from project import throttling
from tests.redis_server import free_port

TOKEN = "/api/auth/token/"
ADMIN_LOGIN = "/admin/login/"
API_LOGIN = "/api/auth/login/"
DEPLOYMENTS = "/api/v2/deployments/"
PASSWORD = "a long enough password"
ATTACKER = "203.0.113.66"
OWNER = "198.51.100.7"


@pytest.fixture(autouse=True)
def closed_breaker():
    """No test inherits another's "Redis is down, skip it for a while"."""
    throttling.breaker.succeeded()
    yield
    throttling.breaker.succeeded()


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """Hundreds of password checks here: a hasher that takes microseconds, not a fifth of a
    second (the limits count attempts, whatever they cost)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def alice(db) -> User:
    return User.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def root(db) -> User:
    return User.objects.create_superuser("root", password=PASSWORD)


def rates(**changed: str):
    """``override_settings`` with some of ``DEFAULT_THROTTLE_RATES`` changed."""
    framework = copy.deepcopy(settings.REST_FRAMEWORK)
    framework["DEFAULT_THROTTLE_RATES"].update(changed)
    return override_settings(REST_FRAMEWORK=framework)


def throttle_redis(url: str, **more):
    """``override_settings`` pointing the throttle cache at another Redis."""
    caches = copy.deepcopy(settings.CACHES)
    caches["throttle"]["LOCATION"] = url
    return override_settings(CACHES=caches, **more)


def token(client: Client, password: str, username: str = "alice", ip: str = ATTACKER):
    return client.post(TOKEN, {"username": username, "password": password}, REMOTE_ADDR=ip)


def admin_login(client: Client, password: str, username: str = "root", ip: str = ATTACKER):
    return client.post(
        ADMIN_LOGIN,
        {"username": username, "password": password, "next": "/admin/"},
        REMOTE_ADDR=ip,
    )


def outage_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "project.throttling" and r.levelno == logging.WARNING
    ]


# --- the token endpoint ---------------------------------------------------------------------


def test_the_eleventh_wrong_password_in_a_minute_is_a_429_even_when_right(client, alice):
    assert [token(client, "guess").status_code for _ in range(10)] == [400] * 10

    refused = token(client, "guess")
    right = token(client, PASSWORD)

    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert "Too many failed sign-in attempts" in refused.json()["detail"]
    assert f"available in {refused['Retry-After']} seconds" in refused.json()["detail"]
    assert right.status_code == 429, "the right password got through a lockout"
    assert "token" not in right.json()


def test_a_lockout_holds_one_client_and_username_only(client, alice):
    User.objects.create_user("bob", password=PASSWORD)
    for _ in range(11):
        token(client, "guess")
    assert token(client, PASSWORD).status_code == 429

    from_elsewhere = token(client, PASSWORD, ip=OWNER)
    other_user = token(client, PASSWORD, username="bob")

    assert from_elsewhere.status_code == 200 and from_elsewhere.json()["token"]
    assert other_user.status_code == 200


def test_a_username_in_other_case_or_spacing_counts_against_the_same_lockout(client, alice):
    for name in ["alice", "Alice", " ALICE "] * 4:
        token(client, "guess", username=name)

    assert token(client, PASSWORD).status_code == 429


def test_successful_sign_ins_do_not_count_as_failures(client, alice):
    assert [token(client, PASSWORD).status_code for _ in range(15)] == [200] * 15
    assert [token(client, "guess").status_code for _ in range(10)] == [400] * 10
    assert token(client, "guess").status_code == 429


def test_the_lockout_lifts_once_the_window_has_passed(client, alice):
    with rates(login="3/s"):
        assert [token(client, "guess").status_code for _ in range(4)] == [400, 400, 400, 429]
        time.sleep(1.2)
        assert token(client, PASSWORD).status_code == 200


def test_parallel_guesses_cannot_slip_past_the_limit(transactional_db):
    """Each guess is counted before its password is checked, so 30 at once get 10 answers."""
    statuses: list[int] = []
    start = threading.Barrier(30)

    def guess(n: int) -> None:
        try:
            start.wait()
            statuses.append(token(Client(), f"guess {n}", username="ghost").status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == [400] * 10 + [429] * 20


# --- the login forms ------------------------------------------------------------------------


def test_the_admin_refuses_the_right_password_after_ten_failures(client, root):
    for _ in range(10):
        failed = admin_login(client, "guess")
        assert failed.status_code == 200
        assert "Please enter the correct username and password" in failed.text

    locked = admin_login(client, PASSWORD)

    assert locked.status_code == 429
    assert "Too many failed sign-in attempts" in locked.text
    assert f"Try again in {locked['Retry-After']} seconds" in locked.text
    assert 1 <= int(locked["Retry-After"]) <= 60
    assert client.get("/admin/", REMOTE_ADDR=ATTACKER).status_code == 302, "signed in anyway"
    assert client.get(ADMIN_LOGIN, REMOTE_ADDR=ATTACKER).status_code == 200  # the form opens
    assert admin_login(client, PASSWORD, ip=OWNER)["Location"] == "/admin/"
    assert client.get("/admin/", REMOTE_ADDR=OWNER).status_code == 200


def test_the_browsable_api_login_is_limited_like_the_others(client, alice):
    form = {"username": "alice", "password": "guess", "next": DEPLOYMENTS}
    for _ in range(10):
        assert client.post(API_LOGIN, form, REMOTE_ADDR=ATTACKER).status_code == 200

    locked = client.post(API_LOGIN, {**form, "password": PASSWORD}, REMOTE_ADDR=ATTACKER)

    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session


# --- request rates --------------------------------------------------------------------------


def test_anonymous_clients_are_limited_per_address(client, db):
    with rates(anon="3/min"):
        statuses = [client.get(DEPLOYMENTS, REMOTE_ADDR=ATTACKER).status_code for _ in range(4)]
        other = client.get(DEPLOYMENTS, REMOTE_ADDR=OWNER)
        refused = client.get(DEPLOYMENTS, REMOTE_ADDR=ATTACKER)

    assert statuses == [200, 200, 200, 429]
    assert other.status_code == 200
    assert 1 <= int(refused["Retry-After"]) <= 60


def test_a_forged_forwarded_for_header_does_not_reset_the_count(client, db):
    with rates(anon="3/min"):
        statuses = [
            client.get(
                DEPLOYMENTS, REMOTE_ADDR=ATTACKER, HTTP_X_FORWARDED_FOR=f"10.0.0.{n}"
            ).status_code
            for n in range(4)
        ]

    assert statuses == [200, 200, 200, 429]


def test_signed_in_users_are_limited_per_user(client, alice):
    User.objects.create_user("bob", password=PASSWORD)
    keys = {name: token(client, PASSWORD, name).json()["token"] for name in ("alice", "bob")}

    def get(name: str) -> int:
        auth = f"Token {keys[name]}"
        return client.get(DEPLOYMENTS, HTTP_AUTHORIZATION=auth, REMOTE_ADDR=OWNER).status_code

    with rates(user="3/min"):
        statuses = [get("alice") for _ in range(4)]
        bob = get("bob")

    assert statuses == [200, 200, 200, 429]
    assert bob == 200


# --- Redis down or hung: served without limits, one line --------------------------------------


def test_with_redis_down_requests_are_served_and_the_outage_logged_once(client, alice, caplog):
    caplog.set_level(logging.INFO, logger="project.throttling")
    down = f"redis://127.0.0.1:{free_port()}/0"

    with throttle_redis(down, COUNTS_REDIS_COOLDOWN_MS=0), rates(anon="3/min"):
        wrong = [token(client, "guess").status_code for _ in range(15)]
        right = token(client, PASSWORD)
        reads = [client.get(DEPLOYMENTS, REMOTE_ADDR=OWNER).status_code for _ in range(5)]
        form = admin_login(client, PASSWORD, username="alice")

    assert wrong == [400] * 15
    assert right.status_code == 200
    assert reads == [200] * 5
    assert form.status_code == 200  # alice is no staff: the form again, not a 500
    [line] = outage_lines(caplog)
    assert f"redis at {down.split('//')[1].split('/')[0]} unavailable" in line
    assert "without rate limits" in line


def test_a_hung_redis_costs_one_short_wait_then_limits_return_when_it_answers(
    client, alice, own_redis, caplog
):
    caplog.set_level(logging.INFO, logger="project.throttling")
    with throttle_redis(own_redis.url, COUNTS_REDIS_COOLDOWN_MS=300):
        own_redis.hang()
        try:
            started = time.monotonic()
            wrong = [token(client, "guess").status_code for _ in range(12)]
            elapsed = time.monotonic() - started
        finally:
            own_redis.resume()
        time.sleep(0.4)  # the cool-down passes
        after = [token(client, "guess").status_code for _ in range(11)]

    assert wrong == [400] * 12
    assert elapsed < 5, f"12 sign-ins took {elapsed:.1f} s against a hung Redis"
    assert after == [400] * 10 + [429]
    assert len(outage_lines(caplog)) == 1
    assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
