"""Operator endpoints and the web's answer to a database that does not answer.

- ``/healthz``: the process is alive and serving (touches nothing else), for a liveness probe.
- ``/readyz``: this deployment can do its job: PostgreSQL answers, Redis answers, every count
  trigger is INSTALLED (``counts.operate.status.trigger_states``) and the scheduler was seen within
  ``COUNTS_SCHEDULER_STALE_S`` (``workers.heartbeat``). 200 when all pass, 503 naming the check
  that failed, always JSON.
- ``/metrics``: Prometheus text from ``workers.metrics.REGISTRY``.
- :class:`DatabaseUnavailableMiddleware`: PostgreSQL down turns into a 503 and one log line,
  instead of a 500 with a traceback (a debug page with DEBUG on): a short HTML page for a
  browser or the admin, a one-line JSON body for the API and scripts.

Probes and monitors send HEAD as well as GET: the endpoints answer both, the same way.
"""

from __future__ import annotations

import html
import logging
import threading
import time

import redis
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpResponse, JsonResponse
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from counts.base.errors import first_line

logger = logging.getLogger(__name__)

#: What a client is told to wait before retrying after a 503.
RETRY_AFTER_S = 10


class DatabaseUnavailableMiddleware:
    """Map ``OperationalError`` / ``InterfaceError`` raised by a view to a 503.

    Those are the errors of a server that is down, restarting, refusing connections or
    timing a lock out: all "try again shortly", none a bug in the request.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        logger.error(
            "database unavailable for %s %s: %s",
            request.method,
            request.path,
            first_line(exception),
        )
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if wants_html(request):
            response = HttpResponse(UNAVAILABLE_PAGE, status=503, headers=headers)
        else:
            response = JsonResponse({"detail": UNAVAILABLE}, status=503, headers=headers)
        # The line above is this request's one line: Django's own "Service Unavailable" skips
        # a response marked as logged.
        response._has_been_logged = True
        return response


UNAVAILABLE = "The database is unavailable; try again shortly."

#: What a person in a browser (the admin) sees: the same sentence, and the page retries itself.
UNAVAILABLE_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{RETRY_AFTER_S}">
<title>Database unavailable | countdown</title></head>
<body><h1>Database unavailable</h1>
<p>{html.escape(UNAVAILABLE)}</p>
<p>This page reloads itself in {RETRY_AFTER_S} seconds.</p>
</body></html>
"""


def wants_html(request) -> bool:
    """An admin page, or a client that prefers HTML to JSON (a browser): not the API's
    scripts, which send ``Accept: application/json``, ``*/*`` or nothing."""
    try:
        admin = reverse("admin:index")
    except NoReverseMatch:
        admin = "/admin/"
    if request.path.startswith(admin):
        return True
    return request.get_preferred_type(["application/json", "text/html"]) == "text/html"


class NoTracebackForClientErrors(logging.Filter):
    """Drops the traceback Django attaches to a 4xx it logs (a ``PermissionDenied`` becoming a
    403): the client was refused, nothing broke, one line says it all. 5xx keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if 400 <= getattr(record, "status_code", 0) < 500:
            record.exc_info = record.exc_text = None
        return True


@never_cache
@require_safe
def healthz(request):
    return JsonResponse({"status": "ok"})


def _postgresql() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return "answers"


def _triggers() -> str:
    from counts.operate.status import trigger_states

    states = trigger_states()
    bad = [f"{r['table']}.{r['name']} {r['state']}" for r in states if r["state"] != "INSTALLED"]
    if bad:
        raise NotReady(f"{len(bad)} of {len(states)} count triggers not installed: {bad[:5]}")
    return f"{len(states)} installed"


def _redis() -> str:
    from workers.redis_client import client

    client().ping()
    return "answers"


def _scheduler() -> str:
    from workers.heartbeat import SCHEDULER, ago, last_seen

    age = last_seen().get(SCHEDULER)
    if age is None:
        raise NotReady("not seen in the last hour (is `manage.py run_scheduler` running?)")
    if age > settings.COUNTS_SCHEDULER_STALE_S:
        raise NotReady(f"last seen {ago(age)}; expected every {settings.COUNTS_SWEEP_INTERVAL_S}s")
    return f"last seen {ago(age)}"


class NotReady(Exception):
    """A check ran and found something wrong (as opposed to a source not answering)."""


#: (check, what it needs): a check whose source failed is not run, and says so.
CHECKS = (
    ("postgresql", _postgresql, None),
    ("redis", _redis, None),
    ("triggers", _triggers, "postgresql"),
    ("scheduler", _scheduler, "redis"),
)


def readiness() -> dict:
    checks: dict[str, dict] = {}
    for name, check, needs in CHECKS:
        if needs and not checks[needs]["ok"]:
            checks[name] = {"ok": False, "detail": f"not checked: {needs} does not answer"}
            continue
        try:
            checks[name] = {"ok": True, "detail": check()}
        except NotReady as exc:
            checks[name] = {"ok": False, "detail": str(exc)}
        except (OperationalError, InterfaceError, redis.RedisError) as exc:
            checks[name] = {"ok": False, "detail": f"does not answer: {first_line(exc)}"}
    failed = [name for name, result in checks.items() if not result["ok"]]
    return {"ready": not failed, "failed": failed, "checks": checks}


class NotReadyLog:
    """One ERROR when this process starts failing /readyz (and when what fails changes), one
    WARNING when it passes again: a probe every few seconds must not write a line each."""

    def __init__(self) -> None:
        self.failed: tuple[str, ...] = ()
        self.since: float | None = None
        self._lock = threading.Lock()

    def note(self, report: dict) -> None:
        failed = tuple(report["failed"])
        with self._lock:
            before, since = self.failed, self.since
            self.failed = failed
            self.since = (since or time.monotonic()) if failed else None
        if failed and failed != before:
            details = "; ".join(f"{n}: {report['checks'][n]['detail']}" for n in failed)
            logger.error("not ready (%s): %s", ", ".join(failed), details)
        elif not failed and before:
            logger.warning("ready again after %.0f s", time.monotonic() - since)


not_ready_log = NotReadyLog()


@never_cache
@require_safe
def readyz(request):
    report = readiness()
    not_ready_log.note(report)
    response = JsonResponse(report, status=200 if report["ready"] else 503)
    # Logged above, once per outage; not Django's "Service Unavailable" line per probe.
    response._has_been_logged = True
    return response


@never_cache
@require_safe
def metrics(request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from workers.metrics import REGISTRY

    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
