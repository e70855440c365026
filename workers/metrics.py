"""Prometheus metrics: what the workers did, kept in Redis, exposed by the web at ``/metrics``.

Why Redis and not ``prometheus_client``'s multiprocess mode: the counters are incremented in
worker processes, the scheduler and the web's write path, and scraped from a web process.
Multiprocess mode shares them through files in one ``PROMETHEUS_MULTIPROC_DIR``, which only
works when every process runs on the same host and the directory is wiped at each restart;
countdown runs workers on as many hosts as needed (DESIGN §5: nothing depends on one process's
memory or disk). Redis is already shared by all of them, so each event is one pipelined
``HINCRBYFLOAT`` on a hash there, and a custom collector reads that hash at scrape time. Any web
process, on any host, serves the same cluster-wide totals. The counters are cumulative and only
reset when Redis loses its data (a restart of a Redis that keeps nothing on disk, as ours are
configured): Prometheus' ``rate()`` and ``increase()`` handle that as a counter reset, but a
raw ``_total`` read across it drops to zero.

Read at scrape time, not stored: pending marks and the oldest mark's age per model (one grouped
query, ``counts.run.marks.pending_summary``), dead-lettered messages (the broker's own keys) and
when each process was last seen (``workers.heartbeat``). A source that does not answer is
reported by ``countdown_source_up{source=...} 0`` and the rest of the scrape still works.

Recording never raises: metrics are reporting, and a Redis outage is logged by the write path
and the sweep already.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections import defaultdict

import redis
from dramatiq.middleware import Middleware
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from counts.api import drain_labels, pending_summary
from workers import heartbeat
from workers.queued import queue_sizes
from workers.redis_client import Breaker, client, key

logger = logging.getLogger(__name__)

#: Counters kept in Redis: name (exposed with ``_total``) -> (help, label names).
COUNTERS = {
    "countdown_drain_batches": ("Non-empty drain transactions committed.", ()),
    "countdown_drain_marks": ("Dirty marks consumed by drains.", ()),
    "countdown_rows_recomputed": ("Target rows recomputed by drains.", ("model",)),
    "countdown_rows_changed": ("Target rows whose stored counts a drain changed.", ("model",)),
    "countdown_messages_sent": ("Messages sent, by actor (retries not included).", ("actor",)),
    "countdown_reconcile_runs": ("Repairing reconcile passes completed.", ()),
    "countdown_reconcile_rows_checked": ("Rows checked by reconcile passes.", ("model",)),
    "countdown_reconcile_drift": (
        "Rows found wrong by reconcile passes (and repaired), per count field.",
        ("model", "field"),
    ),
    "countdown_http_requests": (
        "HTTP requests answered by the web processes, by method and status code.",
        ("method", "status"),
    ),
}
#: The drain latency histogram's name.
DRAIN_SECONDS = "countdown_drain_seconds"
#: Its buckets' upper bounds, in seconds (a batch of 500 marks takes tens of milliseconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The web's request latency histogram, and its buckets.
HTTP_SECONDS = "countdown_http_request_seconds"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Methods counted by name; anything else is "other" (a label value per verb a client
#: invents would grow the series without bound).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _field(name: str, **labels: str) -> str:
    return json.dumps([name, labels], sort_keys=True)


def _store() -> str:
    return key("metrics")


def _add(increments: dict[str, float], breaker: Breaker | None = None) -> None:
    """Add to stored counters in one round trip; a Redis outage only loses these increments.
    With a ``breaker`` (the web's request path), a failure keeps later calls off Redis for a
    cool-down, so an outage costs one request a socket timeout, not every request."""
    increments = {k: v for k, v in increments.items() if v}
    if not increments:
        return

    def write() -> None:
        pipe = client().pipeline(transaction=False)
        for field, amount in increments.items():
            pipe.hincrbyfloat(_store(), field, amount)
        pipe.execute()

    def lost(exc: redis.RedisError) -> None:
        logger.debug("metrics not recorded: %s", exc)

    if breaker is not None:
        breaker.call(write, None, on_down=lost)
        return
    try:
        write()
    except redis.RedisError as exc:
        lost(exc)


def _bucket(bounds: tuple[float, ...], seconds: float) -> str:
    index = bisect.bisect_left(bounds, seconds)
    return str(bounds[index]) if index < len(bounds) else "+Inf"


def record_drain(result) -> None:
    """One committed drain batch (a ``counts.run.draining.DrainResult``)."""
    if result.empty:
        return
    seconds = result.ms / 1000
    increments: dict[str, float] = defaultdict(float)
    increments[_field("countdown_drain_batches")] += 1
    increments[_field("countdown_drain_marks")] += result.marks
    increments[_field(DRAIN_SECONDS, le=_bucket(BUCKETS, seconds))] += 1
    increments[_field(DRAIN_SECONDS + "_sum")] += seconds
    for label, rows in result.targets.items():
        increments[_field("countdown_rows_recomputed", model=label)] += rows
    for label, rows in result.changed.items():
        increments[_field("countdown_rows_changed", model=label)] += rows
    _add(increments)


def on_reconciled(sender, report, **kwargs) -> None:
    """A reconcile pass finished (``counts.base.signals.reconciled``); dry runs repair nothing."""
    if report.dry_run:
        return
    increments: dict[str, float] = {_field("countdown_reconcile_runs"): 1}
    for label, model in report.models.items():
        increments[_field("countdown_reconcile_rows_checked", model=label)] = model.checked
        for name, rows in model.drift.items():
            increments[_field("countdown_reconcile_drift", model=label, field=name)] = rows
    _add(increments)


class CountMessages(Middleware):
    """Count messages as the broker accepts them, once each.

    A delayed message is enqueued twice under one id (into the delay queue with its ``eta``,
    then into the queue when due) and a retry is a re-enqueue: only the first enqueue counts.
    """

    def after_enqueue(self, broker, message, delay) -> None:
        if message.options.get("retries") or ("eta" in message.options and not delay):
            return
        _add({_field("countdown_messages_sent", actor=message.actor_name): 1})


#: Keeps the web's request path off a Redis that failed, for a cool-down.
_requests = Breaker()


class RequestMetrics:
    """Django middleware: count each request by method and status, and time it.

    Kept in Redis with the other counters, so the totals are the whole web tier's whatever
    gunicorn worker a scrape reaches (per-process counters would each describe one of them).
    One pipelined round trip per request; scrapes of ``/metrics`` itself are left out.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        if request.path != "/metrics":
            seconds = time.perf_counter() - started
            method = request.method if request.method in HTTP_METHODS else "other"
            status = str(response.status_code)
            bound = _bucket(HTTP_BUCKETS, seconds)
            _add(
                {
                    _field("countdown_http_requests", method=method, status=status): 1,
                    _field(HTTP_SECONDS, le=bound): 1,
                    _field(HTTP_SECONDS + "_sum"): seconds,
                },
                _requests,
            )
        return response


def _stored() -> dict[str, dict[tuple, float]]:
    """``{name: {label values: value}}`` from the Redis hash."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for field, value in client().hgetall(_store()).items():
        name, labels = json.loads(field)
        out[name][tuple(sorted(labels.items()))] = float(value)
    return out


class CountsCollector(Collector):
    """Everything above, read at scrape time."""

    def collect(self):
        up = GaugeMetricFamily(
            "countdown_source_up", "Whether a source answered this scrape.", labels=["source"]
        )
        for source, read in (("postgresql", self._pending), ("redis", self._redis)):
            try:
                families = list(read())
            except Exception as exc:  # a scrape reports what it can; the rest says why not
                logger.warning("metrics: %s did not answer: %s", source, exc)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _pending(self):
        marks = GaugeMetricFamily(
            "countdown_pending_marks", "Dirty marks waiting, per target model.", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "countdown_pending_oldest_seconds",
            "Age of the oldest waiting mark, per target model.",
            labels=["model"],
        )
        due = GaugeMetricFamily(
            "countdown_pending_oldest_due_seconds",
            "How long the oldest due mark has waited, per target model: what staleness alerts"
            " should watch (marks put back for a held row are not due until their retry time).",
            labels=["model"],
        )
        found = {row.label: row for row in pending_summary()}
        # Every model and item kind, 0 when nothing waits: a series that vanished at 0 would
        # read as "no data" to an alert, and its last value as still pending to a graph.
        for label in sorted({*drain_labels(), *found}):
            row = found.get(label)
            marks.add_metric([label], row.marks if row else 0)
            oldest.add_metric([label], row.oldest_seconds if row else 0)
            due.add_metric([label], row.oldest_due_seconds if row else 0)
        yield from (marks, oldest, due)

    def _redis(self):
        stored = _stored()
        for name, (doc, labels) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=list(labels))
            for label_items, value in sorted(stored.get(name, {}).items()):
                values = dict(label_items)
                family.add_metric([values.get(name, "") for name in labels], value)
            yield family
        yield self._histogram(
            stored, DRAIN_SECONDS, BUCKETS, "Duration of one committed drain transaction (seconds)."
        )
        yield self._histogram(
            stored, HTTP_SECONDS, HTTP_BUCKETS, "Time to answer one HTTP request (seconds)."
        )
        dead = GaugeMetricFamily(
            "countdown_dead_letters", "Messages in the dead-letter set.", labels=["queue"]
        )
        dead.add_metric(["counts"], queue_sizes()["dead"])
        yield dead
        yield from self._processes(heartbeat)

    @staticmethod
    def _processes(heartbeat):
        """When each role was last seen on each host (Unix time, Redis's clock), and how many
        of its processes were seen lately. Labelled by host, not by pid: a label per pid
        would start a new series at every restart."""
        seen_at = GaugeMetricFamily(
            "countdown_process_last_seen_timestamp_seconds",
            "When a scheduler or worker process on this host was last seen (Unix time).",
            labels=["role", "host"],
        )
        live = GaugeMetricFamily(
            "countdown_processes_live",
            "Processes of each role seen within their stale threshold (as counts status).",
            labels=["role"],
        )
        latest: dict[tuple[str, str], float] = {}
        alive = {heartbeat.SCHEDULER: 0, heartbeat.WORKER: 0}
        now = client().time()[0]
        for name, age in heartbeat.last_seen().items():
            role, _, ident = name.partition(":")
            host = ident.rpartition(":")[0] if ident else ""
            latest[(role, host)] = max(latest.get((role, host), 0.0), now - age)
            if age <= heartbeat.stale_after_s(role):
                alive[role] = alive.get(role, 0) + 1
        for (role, host), at in sorted(latest.items()):
            seen_at.add_metric([role, host], at)
        for role, n in sorted(alive.items()):
            live.add_metric([role], n)
        yield from (seen_at, live)

    @staticmethod
    def _histogram(stored, name: str, bounds: tuple, doc: str) -> HistogramMetricFamily:
        per_bucket = {dict(k).get("le"): v for k, v in stored.get(name, {}).items()}
        cumulative, buckets = 0.0, []
        for bound in [*(str(b) for b in bounds), "+Inf"]:
            cumulative += per_bucket.get(bound, 0.0)
            buckets.append((bound, cumulative))
        total = sum(stored.get(name + "_sum", {}).values())
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], buckets, sum_value=total)
        return family


#: What ``/metrics`` serves: the collector above (the system's figures, the same from any web
#: process) and the standard process and Python collectors, which describe the web process
#: that answered the scrape (CPU, memory, open files, garbage collection), as in any Python
#: service; Prometheus tells the processes apart by the scrape target.
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(CountsCollector())
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
