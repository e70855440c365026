"""Settings for countdown, read from the environment.

Everything an operator changes between machines comes from environment variables so the same
code runs on a laptop, in CI and in production: ``DATABASE_URL``, ``REDIS_URL``, ``SECRET_KEY``
(required once ``DEBUG`` is off), ``DEBUG``, ``ALLOWED_HOSTS`` and the ``COUNTS_*`` knobs below.
"""

import os
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean environment variable; anything but 1/true/yes/on is false."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    """Read an integer environment variable, failing loudly on garbage."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "insecure-local-development-key-only-used-when-DEBUG-is-on"

ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")
    if h.strip()
]

#: HTTPS. Off by default, so plain-HTTP runs (bin/run, the tests, a shell script) answer 200
#: instead of redirecting to an https:// that nothing serves. ``HTTPS=1`` is the production
#: switch: it turns on everything ``manage.py check --deploy`` asks for; each setting can still
#: be set on its own through the variable of the same name.
HTTPS = env_bool("HTTPS", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", HTTPS)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", HTTPS)
#: Probes and Prometheus reach the process itself over plain HTTP, behind the TLS terminator.
SECURE_REDIRECT_EXEMPT = [r"^(healthz|readyz|metrics)$"]
#: Origins (with scheme) allowed to POST forms, e.g. ``https://countdown.example.com``.
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]
#: ``HEADER,value`` set by the TLS-terminating proxy, e.g. ``HTTP_X_FORWARDED_PROTO,https``.
#: Needed with SECURE_SSL_REDIRECT behind such a proxy, or every request redirects forever.
if _proxy_ssl_header := os.environ.get("SECURE_PROXY_SSL_HEADER", "").strip():
    _header, _, _value = _proxy_ssl_header.partition(",")
    if not (_header.strip() and _value.strip()):
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must be HEADER,value; got {_proxy_ssl_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_header.strip(), _value.strip())

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_dramatiq",
    "counts",
    "workers",
    "project.monitoring",
    "bench",
]
#: The counts engine's own test app (``tests/engine_app``, label ``counts_testapp``): installed
#: only for tests, so its tables exist in test databases and never in production. Under pytest
#: the variable is exported, so the workers and commands tests start as subprocesses load the
#: same apps as the test process.
if "pytest" in sys.modules:
    os.environ.setdefault("COUNTS_TEST_APP", "1")
if env_bool("COUNTS_TEST_APP", False):
    INSTALLED_APPS.append("tests.engine_app")

MIDDLEWARE = [
    # Counts and times every request (Prometheus, kept in Redis: workers.metrics), outermost so
    # it sees the status every other middleware settled on.
    "workers.metrics.RequestMetrics",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # PostgreSQL not answering: a 503 with a one-line JSON body, not a 500 (or a debug page).
    "project.health.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                # When the scheduler and workers were last seen (the pending-marks page).
                "workers.heartbeat.context",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/countdown"),
        conn_max_age=env_int("CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
#: A server that does not answer fails a connection in seconds, not after TCP's minutes.
DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
    "connect_timeout", env_int("DB_CONNECT_TIMEOUT_S", 5)
)
#: No JIT compilation on the app's connections (``DB_JIT=on`` to allow it). Every query here is
#: short, but some are estimated expensive: a list page's freshness flags read the mark queue
#: through arms the planner sizes as whole tables, and compiling them cost 0.5-1.6 s a request
#: against 5-70 ms run without (measured in the tests and at 10⁶). The engine's own
#: transactions turn it off anyway (``counts.run.engine_transaction``).
#: Added to ``PGOPTIONS``, which a connection's ``options`` would otherwise replace (an operator's
#: ``PGOPTIONS="-c lock_timeout=300"`` keeps working).
if os.environ.get("DB_JIT", "off") != "on":
    _pgoptions = os.environ.get("PGOPTIONS", "")
    DATABASES["default"]["OPTIONS"].setdefault(
        "options", _pgoptions if "jit" in _pgoptions else f"{_pgoptions} -c jit=off".strip()
    )
if not DATABASES["default"]["ENGINE"].endswith("postgresql"):
    raise ImproperlyConfigured(
        "countdown needs PostgreSQL: its dirty marks are written by triggers."
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# Dramatiq over Redis. DbConnectionsMiddleware comes before AdminMiddleware (django-dramatiq's
# advice); the admin middleware that writes a row per task is left out: at 10⁶ writes a day it
# would be the busiest table in the database.
#: Seconds the broker's connections wait to connect to and hear from Redis. The broker's send
#: runs on the write path (after commit): a hung Redis must not hold a request for long. The
#: worker's own calls (fetch, ack) are short Lua scripts, far below it.
COUNTS_BROKER_TIMEOUT_S = os.environ.get("COUNTS_BROKER_TIMEOUT_S", "1")


def with_query_defaults(url: str, **defaults: str) -> str:
    """``url`` with query parameters added where it does not set them already."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**defaults, **query})))


DRAMATIQ_BROKER = {
    "BROKER": "workers.broker.RedisBroker",
    "OPTIONS": {
        # RedisBroker builds its pool from the URL alone: timeouts go in its query string.
        "url": with_query_defaults(
            REDIS_URL,
            socket_connect_timeout=COUNTS_BROKER_TIMEOUT_S,
            socket_timeout=COUNTS_BROKER_TIMEOUT_S,
        ),
        "namespace": os.environ.get(
            "DRAMATIQ_NAMESPACE", "countdown-test" if "pytest" in sys.modules else "countdown"
        ),
    },
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
        "dramatiq.middleware.CurrentMessage",
        "django_dramatiq.middleware.DbConnectionsMiddleware",
        # Each worker process says it is alive (readyz, counts status, the admin).
        "workers.heartbeat.WorkerHeartbeat",
        # Messages sent, counted in Redis for /metrics (see workers.metrics).
        "workers.metrics.CountMessages",
        # One line per Redis outage in the worker's log, instead of CRITICALs every 3 s.
        "workers.outages.QuietRedisOutages",
    ],
}
DRAMATIQ_AUTODISCOVER_MODULES = ["actors"]
# Dead-letters a payload that is not a message instead of crashing the consumer on it.
DRAMATIQ_ENCODER = "workers.encoding.DeadLetteringJSONEncoder"
DRAMATIQ_TASKS_DATABASE = "default"

# The counts engine and its workers.
#: Debounce window: writes within it share one recompute message.
COUNTS_DEBOUNCE_MS = env_int("COUNTS_DEBOUNCE_MS", 1000)
#: Extra life of the debounce key beyond the window, so a slow worker start cannot lose it.
COUNTS_DEBOUNCE_MARGIN_MS = env_int("COUNTS_DEBOUNCE_MARGIN_MS", 30_000)
#: Prefix of every Redis key the workers own.
COUNTS_REDIS_PREFIX = os.environ.get(
    "COUNTS_REDIS_PREFIX",
    "countdown-test:counts" if "pytest" in sys.modules else "countdown:counts",
)
#: Marks taken per drain transaction.
COUNTS_DRAIN_BATCH = env_int("COUNTS_DRAIN_BATCH", 500)
#: Seconds one recompute_pending message may drain before it hands over to a fresh message.
COUNTS_DRAIN_BUDGET_S = env_int("COUNTS_DRAIN_BUDGET_S", 20)
#: Life of the "a drainer is active" flag; renewed every batch, so only a dead drainer lets
#: it lapse.
COUNTS_DRAINING_TTL_MS = env_int("COUNTS_DRAINING_TTL_MS", 30_000)
#: Milliseconds a drain waits for a lock ``SKIP LOCKED`` cannot skip (a table lock, another
#: drain's new ledger row, a multiplicity row) before failing and being retried. Target rows
#: are waited for 200 ms at most, then put back (``counts.run.target_locks``).
COUNTS_LOCK_TIMEOUT_MS = env_int("COUNTS_LOCK_TIMEOUT_MS", 10_000)
#: Most extra drain messages one recompute sends when it finds a large backlog.
COUNTS_FANOUT = env_int("COUNTS_FANOUT", 4)
#: Drains prepare their hot statements once per connection (``counts.base.prepared``). Off behind
#: a pooler that cannot keep prepared statements (PgBouncer in transaction mode before 1.21).
COUNTS_PREPARED_STATEMENTS = env_bool("COUNTS_PREPARED_STATEMENTS", True)
#: Seconds between scheduler sweeps for marks that have no message (raw SQL, lost messages).
COUNTS_SWEEP_INTERVAL_S = env_int("COUNTS_SWEEP_INTERVAL_S", 2)
#: Seconds a due mark may wait with no drainer of its model at work before the sweep sends a
#: drain whatever the broker says is queued, fetched or retrying (``workers.schedule``).
COUNTS_RESCUE_AFTER_S = env_int("COUNTS_RESCUE_AFTER_S", 3)
#: ``counts status`` exits non-zero (and ``/metrics`` shows it) once a model's oldest due mark
#: has waited this long: an alert, not a page that says "pending" forever.
COUNTS_STALE_ALERT_S = env_int("COUNTS_STALE_ALERT_S", 60)
#: Seconds a count's backfill may stop renewing its lease before the workers take over what it
#: left (``counts.operate.backfill``): how long counts can lag after a ``migrate`` that was killed.
COUNTS_BACKFILL_LEASE_S = float(os.environ.get("COUNTS_BACKFILL_LEASE_S", "60"))
#: Stale items per item kind an exact read resolves for a page (``counts.run.exact``); over it
#: the page's rows get their stored values (plus queued amounts) and ``counts_exact`` false.
COUNTS_EXACT_BUDGET = env_int("COUNTS_EXACT_BUDGET", 5000)
#: Milliseconds the trigger-install step of a migration waits for its table locks before it
#: rolls back and tries again (``counts.operations.SyncCountTriggers``), and how many times.
COUNTS_TRIGGER_LOCK_TIMEOUT_MS = env_int("COUNTS_TRIGGER_LOCK_TIMEOUT_MS", 2000)
COUNTS_TRIGGER_LOCK_ATTEMPTS = env_int("COUNTS_TRIGGER_LOCK_ATTEMPTS", 8)
#: Milliseconds before the second try, doubled after each further one (with jitter).
COUNTS_TRIGGER_LOCK_BACKOFF_MS = env_int("COUNTS_TRIGGER_LOCK_BACKOFF_MS", 500)
#: Seconds between heartbeats of a worker process (the scheduler beats every sweep).
COUNTS_HEARTBEAT_INTERVAL_S = env_int("COUNTS_HEARTBEAT_INTERVAL_S", 10)
#: /readyz fails when the scheduler was last seen longer ago than this.
COUNTS_SCHEDULER_STALE_S = env_int("COUNTS_SCHEDULER_STALE_S", max(30, 3 * COUNTS_SWEEP_INTERVAL_S))
#: Milliseconds the workers' own Redis client waits to connect and for an answer.
COUNTS_REDIS_TIMEOUT_MS = env_int("COUNTS_REDIS_TIMEOUT_MS", 250)
#: Milliseconds writers skip Redis after a failed call (the sweep covers their marks).
COUNTS_REDIS_COOLDOWN_MS = env_int("COUNTS_REDIS_COOLDOWN_MS", 5000)
#: Milliseconds without a heartbeat after which a worker's unacknowledged messages count as
#: lost for the sweep (the broker itself redelivers them only after minutes).
COUNTS_WORKER_LOST_MS = env_int("COUNTS_WORKER_LOST_MS", 10_000)
#: Seconds between full reconcile passes.
COUNTS_RECONCILE_INTERVAL_S = env_int("COUNTS_RECONCILE_INTERVAL_S", 6 * 3600)

#: "default" stays in-process (Django's own default before this was set). "throttle" holds
#: request rates and failed sign-ins in Redis, shared by every web process; its timeouts are
#: short so a hung Redis costs one request a fraction of a second, after which limits are
#: skipped for a while (``project.throttling``). Each test process has keys of its own.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": os.environ.get(
            "THROTTLE_KEY_PREFIX",
            f"countdown-test:throttle:{os.getpid()}"
            if "pytest" in sys.modules
            else "countdown:throttle",
        ),
        "OPTIONS": {
            "socket_connect_timeout": COUNTS_REDIS_TIMEOUT_MS / 1000,
            "socket_timeout": COUNTS_REDIS_TIMEOUT_MS / 1000,
        },
    },
}

REST_FRAMEWORK = {
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 25,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    # Authenticated by default: a token for scripts (``Authorization: Token <key>``, first so
    # that a refusal is a 401 carrying ``WWW-Authenticate: Token``) and the session for the
    # browsable API. Views that serve public projects to anonymous clients say so themselves.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "project.monitoring.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Request rates per client address (anonymous) or per user, counted in Redis so every web
    # process shares them; a Redis outage lifts them instead of failing requests
    # (``project.throttling``). "login" is failed sign-ins per client address and username,
    # on /api/auth/token/, /api/auth/login/ and /admin/login/.
    "DEFAULT_THROTTLE_CLASSES": [
        "project.throttling.AnonRateThrottle",
        "project.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": os.environ.get("THROTTLE_ANON_RATE", "120/min"),
        "user": os.environ.get("THROTTLE_USER_RATE", "600/min"),
        "login": os.environ.get("THROTTLE_LOGIN_RATE", "10/min"),
    },
    # Reverse proxies in front of the web that append to X-Forwarded-For: the client address
    # is then read from that header, that many hops from its end. Unset (the default), only
    # REMOTE_ADDR counts: a client could otherwise name any address it likes and escape its
    # limits. Set it behind a proxy, or every client shares the proxy's address and its limits.
    "NUM_PROXIES": int(os.environ["NUM_PROXIES"]) if os.environ.get("NUM_PROXIES") else None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "countdown API",
    "DESCRIPTION": "Monitoring lists with exact cached counts and their freshness.",
    "VERSION": "2",
    # The schema documents the API, not the endpoint that serves it.
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and Redoc from our own static files (drf-spectacular-sidecar, served by
    # whitenoise), not a CDN: the docs work offline and the version is pinned by the package.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Schema and docs stay readable without signing in (drf-spectacular's default, on purpose).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "filters": {"no_4xx_traceback": {"()": "project.health.NoTracebackForClientErrors"}},
    "loggers": {
        # Named so that dictConfig drops the handler Django's own default config gives it (on
        # with DEBUG): records reach the root handler only, one line each, not two.
        "django": {"level": "INFO"},
        # A 403 (PermissionDenied) is the client's problem: one line, not a traceback.
        "django.request": {"filters": ["no_4xx_traceback"]},
        "django.db.backends": {"level": "WARNING"},
        # One line per sweep every few seconds says nothing; failures still log at ERROR.
        "apscheduler": {"level": "WARNING"},
    },
}
