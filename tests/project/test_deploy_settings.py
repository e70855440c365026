"""Production settings from the environment: ``HTTPS=1`` makes ``check --deploy`` clean, and
without it a plain-HTTP run still answers 200.

Settings are read at import, so every case is a subprocess with its own environment, talking
to the test database (``worker_subprocess_env``).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from tests import worker_harness as wh
from tests.project.test_health import ROOT, run_manage

#: A browser's requests over plain HTTP and, behind a TLS proxy, over HTTPS.
HTTP_PROBE = """
import json, django
django.setup()
from django.test import Client

def answer(r):
    cookie = r.cookies.get("csrftoken")
    return {"status": r.status_code, "location": r.get("Location", ""),
            "hsts": r.get("Strict-Transport-Security", ""),
            "secure_cookie": bool(cookie and cookie["secure"])}

plain = Client()
https = Client(enforce_csrf_checks=True, HTTP_X_FORWARDED_PROTO="https")
result = {
    "plain_login": answer(plain.get("/admin/login/", HTTP_HOST="127.0.0.1")),
    "plain_healthz": answer(plain.get("/healthz", HTTP_HOST="127.0.0.1")),
    "https_login": answer(https.get("/admin/login/", HTTP_HOST="127.0.0.1")),
}
token = https.cookies["csrftoken"].value if "csrftoken" in https.cookies else ""
post = https.post("/admin/login/", {"username": "nobody", "password": "wrong",
                                    "csrfmiddlewaretoken": token},
                  HTTP_HOST="127.0.0.1", HTTP_ORIGIN="https://countdown.example.com")
result["https_post_from_trusted_origin"] = answer(post)
print(json.dumps(result))
"""


def production_env(**extra: str) -> dict[str, str]:
    """DEBUG off and a real secret key; no HTTPS variable unless ``extra`` sets one."""
    env = wh.worker_subprocess_env(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50))
    for name in ("HTTPS", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_PROXY_SSL_HEADER"):
        env.pop(name, None)
    return {**env, **extra}


def probe(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", HTTP_PROBE],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.django_db
def test_check_deploy_is_clean_with_https_on():
    result = run_manage(production_env(HTTPS="1"), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNINGS" not in result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db
def test_check_deploy_without_https_still_names_what_is_off():
    """The default stays plain HTTP, and ``check --deploy`` says so rather than passing."""
    result = run_manage(production_env(), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr + result.stdout


@pytest.mark.django_db
def test_plain_http_answers_200_without_https_and_redirects_with_it():
    plain = probe(production_env())
    assert plain["plain_login"]["status"] == 200, plain
    assert plain["plain_healthz"]["status"] == 200

    env = production_env(
        HTTPS="1",
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
        CSRF_TRUSTED_ORIGINS="https://countdown.example.com, https://other.example.com",
    )
    on = probe(env)
    assert on["plain_login"]["status"] == 301
    assert on["plain_login"]["location"] == "https://127.0.0.1/admin/login/"
    # A probe over plain HTTP behind the proxy is not redirected away from the process.
    assert on["plain_healthz"]["status"] == 200
    # Behind the TLS proxy: served, HSTS for a year, cookies only over HTTPS.
    assert on["https_login"]["status"] == 200
    assert on["https_login"]["hsts"] == "max-age=31536000; includeSubDomains; preload"
    assert on["https_login"]["secure_cookie"] is True
    # A form posted from a trusted origin passes the CSRF check (wrong password: the form again).
    assert on["https_post_from_trusted_origin"]["status"] == 200, on


@pytest.mark.django_db
def test_each_https_setting_can_be_overridden_on_its_own():
    env = production_env(
        HTTPS="1",
        SECURE_SSL_REDIRECT="0",
        SECURE_HSTS_SECONDS="300",
        SECURE_HSTS_PRELOAD="0",
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    answers = probe(env)
    assert answers["plain_login"]["status"] == 200
    assert answers["https_login"]["hsts"] == "max-age=300; includeSubDomains"


def test_a_malformed_proxy_header_is_refused_at_start():
    env = production_env(SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")
    result = run_manage(env, "check")
    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER must be HEADER,value" in result.stderr
